"""eval.verification.load_bin decodes in a thread pool with cv2 and must return, bitwise, what insightface's loop
(mx.image.imdecode per image, resize_short, nd.transpose, nd.flip) returns."""
import cv2
import mxnet as mx
import numpy as np
import pytest

from eval.verification import load_bin
from iterators.formats.bin_pack import PackFormatError, write_bin


def upstream_load_bin(bins, image_size):
    """insightface recognition/arcface_mxnet/verification.py load_bin, on decoded ``bins``."""
    data_list = [mx.nd.empty((len(bins), 3, image_size[0], image_size[1])) for _ in range(2)]
    for i, b in enumerate(bins):
        img = mx.image.imdecode(b)
        if img.shape[1] != image_size[0]:
            img = mx.image.resize_short(img, image_size[0])
        img = mx.nd.transpose(img, axes=(2, 0, 1))
        for flip in [0, 1]:
            if flip == 1:
                img = mx.ndarray.flip(data=img, axis=2)
            data_list[flip][i][:] = img
    return [d.asnumpy() for d in data_list]


def _pack_images(rng, n, size=24):
    bins = []
    for k in range(n):
        shape = (size + 8, size + 8) if k % 9 == 4 else (size, size)  # resized by load_bin
        bgr = cv2.GaussianBlur(rng.integers(0, 256, shape + (3,), dtype=np.uint8), (5, 5), 0)
        kind = k % 5
        if kind == 0:
            enc = cv2.imencode(".png", bgr)[1]
        elif kind == 1:
            enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(5, 100))])[1]
        elif kind == 2:
            enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
        elif kind == 3:
            enc = cv2.imencode(".jpg", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))[1]
        else:
            enc = cv2.imencode(".bmp", bgr)[1]  # not JPEG/PNG: the mx.image path
        bins.append(enc.tobytes())
    return bins


@pytest.mark.parametrize("num_workers", [0, 1, 3, None])
def test_load_bin_bitwise_equal_to_insightface_loop(tmp_path, num_workers, monkeypatch):
    import eval.verification as verification
    monkeypatch.setattr(verification, "_DECODE_CHUNK", 7)  # several tasks per worker
    rng = np.random.default_rng(0)
    bins = _pack_images(rng, 90)
    issame = [bool(k % 2) for k in range(45)]
    path = tmp_path / "p.bin"
    write_bin(str(path), bins, issame)
    ref = upstream_load_bin(bins, (24, 24))
    data_list, got_issame = load_bin(str(path), (24, 24), num_workers=num_workers)
    assert got_issame == issame
    for got, want in zip(data_list, ref):
        assert got.dtype == np.float32 and got.shape == want.shape == (90, 3, 24, 24)
        np.testing.assert_array_equal(got.asnumpy(), want)
    # the NDArrays work like any other (slicing, arithmetic) after the zero-copy hand-over
    assert float((data_list[0][2:4] * 2).sum().asscalar()) == 2 * float(ref[0][2:4].sum())


def test_load_bin_errors_name_the_image_with_workers(tmp_path):
    rng = np.random.default_rng(1)
    bins = _pack_images(rng, 20)
    bins[13] = b"\xff\xd8\xff not a jpeg"
    path = tmp_path / "bad.bin"
    write_bin(str(path), bins, [True, False] * 5)
    with pytest.raises(PackFormatError, match=r"image 13 \(pair 6\) cannot be decoded"):
        load_bin(str(path), (24, 24), num_workers=2)
    bins[13] = cv2.imencode(".jpg", np.zeros((24, 40, 3), np.uint8))[1].tobytes()
    write_bin(str(path), bins, [True, False] * 5)
    with pytest.raises(PackFormatError, match=r"image 13 \(pair 6\) is 24x40 after resize_short to 24; expected 24x24"):
        load_bin(str(path), (24, 24), num_workers=2)
