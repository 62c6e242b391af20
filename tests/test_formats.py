"""iterators.formats: the shared image-folder scanner, the H,W parser and the atomic writer."""
import os
import stat

import cv2
import numpy as np
import pytest

from eval import build_bin
from iterators.formats import atomic
from iterators.formats.bin_pack import read_bin
from iterators.formats.images import parse_image_size, scan_identity_folder
from iterators.formats.recordio import FaceRecordReader
from iterators.tools import build_rec


def _png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = np.full((12, 12, 3), value, np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _nested_tree(root):
    """Three identities; each has one image at the top and one in a sub-folder (session/)."""
    values = {}
    for k, name in enumerate(["ann", "bob", "cid"]):
        for j, rel in enumerate([f"{name}/a.png", f"{name}/session/b.png"]):
            value = 40 * k + 10 * j + 5
            _png(os.path.join(root, rel), value)
            values[os.path.join(root, rel)] = value
    _png(os.path.join(root, "stray.png"), 250)  # not inside an identity folder: ignored
    return values


def test_scanner_recurses_into_identity_folders_in_sorted_order(tmp_path):
    values = _nested_tree(tmp_path)
    paths, labels, names = scan_identity_folder(tmp_path)
    assert names == ["ann", "bob", "cid"]
    assert labels == [0, 0, 1, 1, 2, 2]
    assert paths == [os.path.join(tmp_path, n, f) for n in names for f in ("a.png", os.path.join("session", "b.png"))]
    assert set(paths) == set(values)


def test_scanner_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="input folder not found: .*nothing"):
        scan_identity_folder(tmp_path / "nothing")
    _nested_tree(tmp_path)
    with pytest.raises(ValueError, match=r"no identity sub-folder with >= 3 images"):
        scan_identity_folder(tmp_path, min_images=3)


def test_rec_and_bin_tools_see_the_same_images_of_one_tree(tmp_path):
    """build_rec and build_bin used to disagree (one recursed, one did not): same tree -> same image set now."""
    root = tmp_path / "faces"
    values = _nested_tree(root)
    items, names = build_rec.scan_folder(root)
    build_rec.build_rec(items, tmp_path / "rec", (12, 12), resize=False)
    with FaceRecordReader(str(tmp_path / "rec" / "train.rec")) as reader:
        rec_values = sorted(int(cv2.imdecode(np.frombuffer(reader.read(i)[1], np.uint8), cv2.IMREAD_COLOR)[0, 0, 0])
                            for i in reader.imgidx)
    # 3 identities x 2 images: 3 genuine pairs exist only if the nested images count; take them all.
    build_bin.build_from_folder(tmp_path / "p.bin", str(root), 6, nfolds=3, seed=0)
    bins, issame = read_bin(tmp_path / "p.bin")
    bin_values = {int(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[0, 0, 0]) for b in bins}
    assert sum(issame) == 3
    assert rec_values == sorted(values.values())
    assert bin_values == set(values.values())


@pytest.mark.parametrize("text, size", [("112,112", (112, 112)), ("112,96", (112, 96)), (" 64, 48", (64, 48))])
def test_parse_image_size(text, size):
    assert parse_image_size(text) == size


@pytest.mark.parametrize("text", ["112", "112,112,3", "a,b", "0,112", "-1,5", ""])
def test_parse_image_size_rejects_with_the_text(text):
    with pytest.raises(ValueError, match="expected H,W"):
        parse_image_size(text)


def test_atomic_write_replaces_whole_file_with_open_permissions(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic.atomic_write_text(path, "first")
    atomic.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # mkstemp's 0600 is not kept
    assert os.listdir(path.parent) == ["x.json"]


def test_atomic_write_failure_keeps_previous_content_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.txt"
    atomic.atomic_write_text(path, "old")

    def half_written(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(path, half_written)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]
