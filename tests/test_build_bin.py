"""eval.build_bin: packs from LFW pairs.txt, pairs_label.txt, identity folders and .rec files."""
import os

import cv2
import numpy as np
import pytest

from eval import build_bin
from iterators.formats.bin_pack import read_bin
from iterators.formats.pairs import read_label_pairs, read_lfw_pairs, sample_pairs
from eval.verification import load_bin


def _label_image(label, k, size=(16, 20)):
    """BGR image whose pixels encode (label, k): decodable back after a lossless PNG round trip."""
    img = np.zeros(size + (3,), np.uint8)
    img[..., 0] = 10 * label
    img[..., 1] = k
    img[..., 2] = 200
    return img


def _write(path, img, ext=".png"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _lfw_tree(root):
    for label, name in enumerate(["Ann_A", "Bob_B", "Cid_C"]):
        for k in (1, 2):
            _write(os.path.join(root, name, f"{name}_{k:04d}.png"), _label_image(label, k))
    pairs = root / "pairs.txt"
    pairs.write_text("1\t2\nAnn_A\t1\t2\nBob_B\t1\t2\nAnn_A\t1\tCid_C\t2\nBob_B\t2\tCid_C\t1\n")
    return pairs


def test_lfw_pairs_txt_keeps_file_bytes_and_order(tmp_path):
    pairs = _lfw_tree(tmp_path)
    out = tmp_path / "lfw.bin"
    assert build_bin.main(["--pairs", str(pairs), "--data-dir", str(tmp_path), "--ext", "png",
                           "--output", str(out)]) == 0
    bins, issame = read_bin(out)
    assert issame == [True, True, False, False]
    expected = ["Ann_A/Ann_A_0001", "Ann_A/Ann_A_0002", "Bob_B/Bob_B_0001", "Bob_B/Bob_B_0002",
                "Ann_A/Ann_A_0001", "Cid_C/Cid_C_0002", "Bob_B/Bob_B_0002", "Cid_C/Cid_C_0001"]
    for b, rel in zip(bins, expected):
        assert b == (tmp_path / (rel + ".png")).read_bytes()
    data_list, _ = load_bin(str(out), (16, 20))
    assert data_list[0].shape == (8, 3, 16, 20)


def test_missing_files_and_bad_lines(tmp_path, capsys):
    pairs = _lfw_tree(tmp_path)
    os.remove(tmp_path / "Cid_C" / "Cid_C_0002.png")
    out = tmp_path / "x.bin"
    args = ["--pairs", str(pairs), "--data-dir", str(tmp_path), "--ext", "png", "--output", str(out)]
    assert build_bin.main(args) == 1
    assert "Cid_C_0002.png" in capsys.readouterr().err and not out.exists()
    assert build_bin.main(args + ["--skip-missing"]) == 0
    assert read_bin(out)[1] == [True, True, False]
    bad = tmp_path / "bad.txt"
    bad.write_text("10 300\nAnn_A 1\n")
    with pytest.raises(ValueError, match=r"bad.txt line 2: 'Ann_A 1'"):
        read_lfw_pairs(str(bad), str(tmp_path))
    bad.write_text("a.png b.png yes\n")
    with pytest.raises(ValueError, match="expected 'path1 path2 0|1'"):
        read_label_pairs(str(bad), str(tmp_path))


def test_label_pairs_with_resize(tmp_path):
    _lfw_tree(tmp_path)
    lst = tmp_path / "pairs_label.txt"
    lst.write_text("Ann_A/Ann_A_0001.png Ann_A/Ann_A_0002.png 1\nAnn_A/Ann_A_0001.png Bob_B/Bob_B_0001.png 0\n")
    out = tmp_path / "l.bin"
    assert build_bin.main(["--pairs", str(lst), "--pairs-format", "label", "--data-dir", str(tmp_path),
                           "--image-size", "8,8", "--encode", "png", "--output", str(out)]) == 0
    bins, issame = read_bin(out)
    assert issame == [True, False]
    assert bins[0] is bins[2] or bins[0] == bins[2]  # the repeated image is encoded once
    img = cv2.imdecode(np.frombuffer(bins[3], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(img, cv2.resize(_label_image(1, 1), (8, 8), interpolation=cv2.INTER_AREA))


def test_image_folder_sampled_pairs_match_sample_pairs(tmp_path):
    root = tmp_path / "faces"
    labels = []
    for label in range(6):
        for k in range(4):
            _write(str(root / f"id{label}" / f"{k}.png"), _label_image(label, k))
            labels.append(f"id{label}")
    out = tmp_path / "own.bin"
    assert build_bin.main(["--image-folder", str(root), "--num-pairs", "20", "--nfolds", "10", "--seed", "3",
                           "--output", str(out)]) == 0
    bins, issame = read_bin(out)
    pairs, expected_issame = sample_pairs(labels, 20, nfolds=10, seed=3)
    assert issame == expected_issame
    for n, (i, j) in enumerate(pairs):
        for b, idx in ((bins[2 * n], i), (bins[2 * n + 1], j)):
            img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
            assert (img[0, 0, 0] // 10, img[0, 0, 1]) == (idx // 4, idx % 4)
    assert build_bin.main(["--image-folder", str(root), "--num-pairs", "30", "--output", str(out)]) == 1


def test_rec_source(tmp_path):
    from iterators.formats.recordio import write_face_rec
    items = []
    for label in range(5):
        for k in range(3):
            ok, buf = cv2.imencode(".png", _label_image(label, k))
            items.append((label, buf.tobytes()))
    info = write_face_rec(str(tmp_path / "ds"), items, image_size=(16, 20))
    out = tmp_path / "rec.bin"
    stats = build_bin.build_from_rec(out, info["path_imgrec"], 20, nfolds=10, seed=0)
    assert stats["pairs"] == 20 and stats["genuine"] == 10
    bins, issame = read_bin(out)
    for n, same in enumerate(issame):
        a, b = (cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_COLOR) for x in bins[2 * n:2 * n + 2])
        assert (a[0, 0, 0] == b[0, 0, 0]) == same  # same label colour <=> genuine pair
        assert not (a[0, 0, 0] == b[0, 0, 0] and a[0, 0, 1] == b[0, 0, 1])  # never an image with itself
    data_list, _ = load_bin(str(out), (16, 20))
    assert data_list[1].shape == (40, 3, 16, 20)


def test_undecodable_image_named(tmp_path):
    root = tmp_path / "faces"
    for label in range(3):
        for k in range(3):
            _write(str(root / f"id{label}" / f"{k}.png"), _label_image(label, k))
    (root / "id1" / "1.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"id1/1.png: cannot be decoded"):
        build_bin.build_from_folder(tmp_path / "o.bin", str(root), 18, nfolds=3, seed=0)  # uses all 9 genuine pairs
