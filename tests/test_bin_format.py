"""iterators.formats.bin_pack: safe reading of every pack flavour in the wild; malformed and malicious packs refused."""
import os
import pickle
import struct

import cv2
import numpy as np
import pytest

from iterators.formats.bin_pack import PackFormatError, read_bin, write_bin


def _jpegs(count, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
        assert ok
        out.append(buf)  # np.ndarray (n, 1) uint8, as build_eval_pack.py stores it
    return out


def _py2_pickle(bins, issame):
    """Bytes of what Python 2's ``pickle.dump((bins, issame), f, protocol=2)`` writes for str payloads.

    Python 2 ``str`` -> SHORT_BINSTRING ('U') / BINSTRING ('T'); Python 3 reads those as ``str``
    decoded with the ``encoding`` argument, so JPEG bytes fail with ASCII and need encoding='bytes'.
    """
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for b in bins:
        out.append(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if s else b"\x89" for s in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def test_python2_pack_needs_encoding_bytes(tmp_path):
    bins = [j.tobytes() for j in _jpegs(4)]
    raw = _py2_pickle(bins, [True, False])
    with pytest.raises(UnicodeDecodeError):  # the fixture really is a py2 str pickle
        pickle.loads(raw)
    assert pickle.loads(raw, encoding="bytes")[0] == bins
    path = tmp_path / "py2.bin"
    path.write_bytes(raw)
    got_bins, issame = read_bin(path)
    assert got_bins == bins
    assert issame == [True, False]
    from eval.verification import load_bin  # and it decodes into insightface's tensors
    data_list, issame = load_bin(str(path), (8, 8))
    assert issame == [True, False] and data_list[0].shape == (4, 3, 8, 8)
    rgb = cv2.imdecode(np.frombuffer(bins[2], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_allclose(data_list[0][2].asnumpy().transpose(1, 2, 0), rgb, atol=2)  # libjpeg builds


def test_python3_bytes_and_numpy_array_packs(tmp_path):
    arrays = _jpegs(4)
    for name, bins, proto in [("bytes", [a.tobytes() for a in arrays], 4), ("ndarray", arrays, 4),
                              ("ndarray_p2", arrays, 2), ("bytes_p2", [a.tobytes() for a in arrays], 2)]:
        path = tmp_path / f"{name}.bin"
        with open(path, "wb") as f:
            pickle.dump((bins, [True, False]), f, protocol=proto)
        got, issame = read_bin(path)
        assert got == [a.tobytes() for a in arrays], name
        assert issame == [True, False]


def test_numpy_bool_issame_and_roundtrip(tmp_path):
    arrays = _jpegs(4)
    path = tmp_path / "np.bin"
    with open(path, "wb") as f:
        pickle.dump((arrays, np.array([True, False])), f)
    assert read_bin(path)[1] == [True, False]
    write_bin(tmp_path / "w.bin", arrays, [np.True_, False])
    assert read_bin(tmp_path / "w.bin") == ([a.tobytes() for a in arrays], [True, False])
    with open(tmp_path / "w.bin", "rb") as f:  # plain pickle (upstream load_bin) reads our packs
        assert pickle.load(f) == ([a.tobytes() for a in arrays], [True, False])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # Unpickling calls open(marker, 'w'): creates the file if the loader executes callables.
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(([_Exploit(str(marker)), b"x"], [True]), protocol=2)
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(PackFormatError, match="refusing to load global '(io|builtins).open'"):
        read_bin(path)
    assert not marker.exists()
    # control: an unrestricted pickle.load executes the payload, so the check above is meaningful
    pickle.loads(payload)[0][0].close()
    assert marker.exists()


def test_os_system_and_codec_abuse_refused(tmp_path):
    class _Shell:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "a.bin").write_bytes(pickle.dumps(([_Shell(), b"x"], [True])))
    with pytest.raises(PackFormatError, match="refusing to load global '(posix|os).system'"):
        read_bin(tmp_path / "a.bin")
    # _codecs.encode is allowed for protocol-2 bytes, but only with latin1
    raw = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R]\x89a\x86."
    (tmp_path / "b.bin").write_bytes(raw)
    with pytest.raises(PackFormatError, match="packs only use latin1"):
        read_bin(tmp_path / "b.bin")


@pytest.mark.parametrize("obj,match", [
    (([b"a", b"b", b"c"], [True]), "3 images is odd"),
    (([b"a", b"b", b"c", b"d"], [True]), "4 images but 1 issame labels"),
    (([b"a", b"b"], ["yes"]), r"issame\[0\] is 'yes'"),
    (([b"a", 5], [True]), "image 1 is a int"),
    (({"bins": []}, [True]), "expected \\(list of images, list of booleans\\)"),
    ([b"a"], "expected a pickled \\(bins, issame_list\\) pair"),
])
def test_malformed_packs_refused(tmp_path, obj, match):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(PackFormatError, match=match) as info:
        read_bin(path)
    assert str(path) in str(info.value)


def test_truncated_and_missing(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
    with pytest.raises(PackFormatError, match="not a readable verification pack"):
        read_bin(path)
    with pytest.raises(FileNotFoundError, match="verification pack not found"):
        read_bin(tmp_path / "nope.bin")


def test_write_bin_validates_and_is_atomic(tmp_path):
    with pytest.raises(TypeError, match="image 1 is a int"):
        write_bin(tmp_path / "x.bin", [b"a", 3], [True])  # bytes(3) would have written b'\0\0\0'
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True])
    assert os.listdir(tmp_path) == []  # nothing half-written
    write_bin(tmp_path / "sub" / "ok.bin", [b"a", b"b"], [False])
    assert os.listdir(tmp_path / "sub") == ["ok.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "sub" / "ok.bin").st_mode & 0o777 == 0o666 & ~umask
