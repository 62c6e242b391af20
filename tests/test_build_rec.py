"""build_rec (folder tree, face2rec2 .lst, unreadable files, resize, alignment) and inspect."""
import json

import cv2
import numpy as np
import pytest

from iterators.tools import build_rec
from iterators.tools import inspect_dataset as inspect
from iterators.augment import decode_image
from iterators.formats.recordio import FaceRecordReader, write_face_rec, write_property

S = 16


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path.read_bytes()


@pytest.fixture
def tree(tmp_path):
    """faces/{alice: 2 png, bob: 3 jpg, carol: 1 png + broken.jpg + notes.txt}; returns (dir, raw bytes by label)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    raw = {0: [], 1: [], 2: []}
    for k in range(2):
        raw[0].append(_write(root / "alice" / f"{k}.png", rng.integers(0, 256, (S, S, 3), dtype=np.uint8)))
    for k in range(3):
        raw[1].append(_write(root / "bob" / f"{k}.jpg", rng.integers(0, 256, (S, S, 3), dtype=np.uint8)))
    raw[2].append(_write(root / "carol" / "a.png", rng.integers(0, 256, (S, S, 3), dtype=np.uint8)))
    (root / "carol" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "carol" / "notes.txt").write_text("ignored: not an image extension")
    return root, raw


def test_folder_tree(tree, tmp_path, capsys):
    root, raw = tree
    out = tmp_path / "out"
    assert build_rec.main(["--input", str(root), "--output", str(out), "--image-size", "16,16",
                           "--num-thread", "2"]) == 0
    printed = capsys.readouterr().out
    assert "6 images, 3 identities, property 3,16,16" in printed
    assert "skipped 1 unreadable/unusable images" in printed
    assert "carol/broken.jpg: not a decodable image" in printed
    assert (out / "property").read_text() == "3,16,16\n"
    reader = FaceRecordReader(str(out / "train.rec"))
    got = [reader.read(i) for i in reader.imgidx]
    # Sorted identities -> labels 0,1,2; right-size aligned jpg/png are packed unchanged (face2rec2).
    assert got == [(lab, b) for lab in (0, 1, 2) for b in raw[lab]]
    assert len(reader.id2range) == 3


def test_min_images_and_resize(tree, tmp_path):
    root, raw = tree
    big = _write(root / "bob" / "z_big.jpg", np.full((24, 20, 3), 200, np.uint8))
    stats = build_rec.build_rec(build_rec.scan_folder(root, min_images=2)[0], tmp_path / "a", (S, S))
    # carol counts 2 image files (one unreadable), so min_images=2 keeps her; the 24x20 image is skipped.
    assert stats["num_identities"] == 3 and stats["num_images"] == 6
    assert any("z_big.jpg" in w and "image is 24x20: FaceImageIter would load it as 19x16, not 16x16; pass "
               "--resize 16,16" in r for w, r in stats["skipped"])
    stats = build_rec.build_rec(build_rec.scan_folder(root, min_images=3)[0], tmp_path / "b", (S, S), resize=True)
    reader = FaceRecordReader(stats["path_imgrec"])
    assert stats["num_images"] == 4 and reader.labels().tolist() == [0, 0, 0, 0]  # only bob: label 0
    resized = reader.read(reader.imgidx[-1])[1]
    assert resized != big and decode_image(resized, (S, S)).shape == (S, S, 3)


def test_sizes_the_iterator_resizes_are_packed_unchanged(tmp_path):
    double = _write(tmp_path / "faces" / "a" / "double.png", np.full((2 * S, 2 * S, 3), 9, np.uint8))
    stats = build_rec.build_rec(build_rec.scan_folder(tmp_path / "faces")[0], tmp_path / "out", (S, S))
    reader = FaceRecordReader(stats["path_imgrec"])
    assert stats["num_skipped"] == 0 and reader.read(1)[1] == double  # resize_short(32x32, 16) = 16x16
    assert build_rec.loaded_size((32, 32), 16) == (16, 16) and build_rec.loaded_size((16, 20), 16) == (16, 20)
    assert build_rec.loaded_size((30, 20), 16) == (24, 16) and build_rec.loaded_size((20, 30), 16) == (16, 24)


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, t = np.deg2rad(20), 1.3, np.array([5.0, -3.0])
    A = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ A.T + t
    M = build_rec.similarity_transform(src, dst)
    np.testing.assert_allclose(M[:, :2], A, atol=1e-9)
    np.testing.assert_allclose(M[:, 2], t, atol=1e-9)


def _landmark_image(M_inv_points):
    img = np.zeros((160, 160, 3), np.uint8)
    for x, y in M_inv_points:
        cv2.circle(img, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    return img


def test_lst_aligned_unaligned_and_skips(tmp_path, capsys):
    rng = np.random.default_rng(2)
    aligned = _write(tmp_path / "imgs" / "a.jpg", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    # Unaligned face: dots at the template rotated 10 degrees, scaled 1.2 and shifted.
    angle = np.deg2rad(10)
    A = 1.2 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = build_rec.ARCFACE_TEMPLATE @ A.T + [20, 10]
    _write(tmp_path / "imgs" / "raw.png", _landmark_image(pts))
    lmk = "\t".join(f"{v:.3f}" for v in np.concatenate([pts[:, 0], pts[:, 1]]))  # 5 x's then 5 y's
    lst = tmp_path / "train.lst"
    lst.write_text(
        "1\timgs/a.jpg\t0\n"
        f"0\timgs/raw.png\t1\t0\t0\t160\t160\t{lmk}\n"
        "0\timgs/raw.png\t1\n"  # not aligned and no landmarks: skipped as face2rec2 does
        "1\timgs/missing.jpg\t1\n")
    out = tmp_path / "out"
    assert build_rec.main(["--input", str(lst), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2" in printed
    assert "train.lst line 3: aligned=0 without landmarks" in printed
    assert "train.lst line 4: cannot read" in printed
    reader = FaceRecordReader(str(out / "train.rec"))
    assert reader.read(1) == (0, aligned)
    label, payload = reader.read(2)
    warped = decode_image(payload, (112, 112))
    assert label == 1
    for x, y in build_rec.ARCFACE_TEMPLATE:  # the dots landed on the template
        assert warped[int(round(y)), int(round(x))].min() > 150
    assert warped[5, 5].max() < 30


def test_lst_errors(tmp_path):
    lst = tmp_path / "bad.lst"
    lst.write_text("1\tonly_two\n")
    with pytest.raises(ValueError, match=r"bad.lst line 1: '1\\tonly_two' has 2 tab-separated fields"):
        build_rec.parse_lst(lst)
    lst.write_text("yes\ta.jpg\t0\n")
    with pytest.raises(ValueError, match=r"bad.lst line 1: aligned 'yes' and label '0' must be integers"):
        build_rec.parse_lst(lst)
    lst.write_text("1\tnope.jpg\t0\n")
    with pytest.raises(ValueError, match=r"all 1 images were skipped, e.g. .*bad.lst line 1: cannot read"):
        build_rec.build_rec(build_rec.parse_lst(lst), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        build_rec.scan_folder(tmp_path / "nothing")


# ----------------------------------------------------------------------------------- inspect
def _png(img):
    return cv2.imencode(".png", img)[1].tobytes()


def test_inspect_report_histogram_and_grid(tmp_path, capsys):
    imgs = [(lab, _png(np.full((S, S, 3), 10 * lab + k, np.uint8))) for lab, n in enumerate([2, 3, 3, 5])
            for k in range(n)]
    write_face_rec(tmp_path, imgs, (S, S))
    grid = tmp_path / "grid.png"
    assert inspect.main([str(tmp_path), "--decode", "--grid", str(grid), "--grid-identities", "3",
                         "--grid-images", "4"]) == 0
    out = capsys.readouterr().out
    assert "header0: [14, 18] -> 13 images, 4 identities" in out
    assert "images: 13" in out and "identities: 4" in out and "labels: 0..3" in out
    assert "images per identity: min 2, median 3, mean 3.25, max 5" in out
    assert "       2:      1 " in out and "       3:      2 " in out and "       5:      1 " in out
    assert out.rstrip().splitlines()[-2] == "OK"
    assert cv2.imread(str(grid)).shape == (3 * S, 4 * S, 3)
    assert inspect.main([str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images_per_identity"] == {"2": 1, "3": 2, "5": 1} and info["errors"] == []


def test_inspect_label_outside_property_is_an_error(tmp_path, capsys):
    write_face_rec(tmp_path, [(0, _png(np.zeros((S, S, 3), np.uint8))), (3, _png(np.ones((S, S, 3), np.uint8)))],
                   (S, S))
    write_property(tmp_path, 3, S, S)
    assert inspect.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR: " in out and "train.rec record 2: label 3 is outside 0..2 (property num_classes=3)" in out
    write_property(tmp_path, 3, S + 1, S)
    info = inspect.inspect_dataset(tmp_path, decode=True)
    assert any("record 1: image is 17x17 after resize_short, expected 17x16" in e for e in info["errors"])
