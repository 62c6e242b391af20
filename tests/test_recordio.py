"""insightface RecordIO layout: byte-level agreement with mx.recordio, header/identity records, property."""
import pickle
import struct
import threading

import mxnet as mx
import numpy as np
import pytest

from iterators.formats import recordio as R

MAGIC = struct.pack("<I", 0xCED7230A)


def _mx_reader(d, prefix="train"):
    return mx.recordio.MXIndexedRecordIO(f"{d}/{prefix}.idx", f"{d}/{prefix}.rec", "r")


def _payloads(n, rng):
    return [rng.bytes(int(rng.integers(0, 40))) for _ in range(n)]


def test_write_face_rec_layout_read_by_mxnet(tmp_path):
    """Unsorted input -> grouped by label; header, image and identity records as RecBuilder writes them."""
    rng = np.random.default_rng(0)
    labels = [2, 0, 1, 0, 2, 1, 1, 3]
    payloads = _payloads(len(labels), rng)
    stats = R.write_face_rec(tmp_path, zip(labels, payloads), image_size=(112, 96))
    # Expected order: stable sort by label.
    order = sorted(range(len(labels)), key=lambda k: labels[k])
    n, classes = len(labels), 4
    assert stats["num_images"] == n and stats["num_classes"] == classes and stats["num_identities"] == classes
    assert stats["header0"] == (n + 1, n + 1 + classes)
    assert (tmp_path / "property").read_text() == "4,112,96\n"

    rec = _mx_reader(tmp_path)
    assert rec.keys == list(range(n + 1 + classes))
    h0, s0 = mx.recordio.unpack(rec.read_idx(0))
    assert h0.flag == 2 and list(h0.label) == [n + 1, n + 1 + classes] and h0.id == 0 and h0.id2 == 1 and s0 == b""
    for new_id, k in enumerate(order, 1):
        h, s = mx.recordio.unpack(rec.read_idx(new_id))
        assert (h.flag, h.label, h.id, h.id2) == (0, labels[k], new_id, 0)
        assert s == payloads[k]
    # identity ranges [start, end) over image ids 1..n: labels 0:{2,4} 1:{3,6,7} 2:{1,5} 3:{8} -> sorted runs
    expected_ranges = [(1, 3), (3, 6), (6, 8), (8, 9)]
    for j, (a, b) in enumerate(expected_ranges):
        h, s = mx.recordio.unpack(rec.read_idx(n + 1 + j))
        assert h.flag == 2 and tuple(h.label) == (a, b) and h.id == n + 1 + j and s == b""
    rec.close()

    reader = R.FaceRecordReader(str(tmp_path / "train.rec"))
    assert reader.header0 == (n + 1, n + 1 + classes)
    assert reader.id2range == {n + 1 + j: r for j, r in enumerate(expected_ranges)}
    assert reader.imgidx == list(range(1, n + 1)) and reader.num_images == n == len(reader)
    assert [reader.read(i) for i in reader.imgidx] == [(labels[k], payloads[k]) for k in order]
    assert reader.labels().tolist() == sorted(labels)
    assert reader.class_ranges(images_filter=2) == [(n + 1, 1, 3), (n + 2, 3, 6), (n + 3, 6, 8)]


def test_sorted_input_is_streamed_and_identical(tmp_path):
    rng = np.random.default_rng(1)
    labels = [0, 0, 1, 2, 2, 2]
    payloads = _payloads(6, rng)
    R.write_face_rec(tmp_path / "a", zip(labels, payloads))
    shuffled = [2, 0, 3, 1, 4, 5]  # labels 1,0,2,0,2,2: same per-class order after a stable sort
    R.write_face_rec(tmp_path / "b", [(labels[k], payloads[k]) for k in shuffled])
    a = (tmp_path / "a" / "train.rec").read_bytes()
    b = (tmp_path / "b" / "train.rec").read_bytes()
    assert a == b
    assert (tmp_path / "a" / "train.idx").read_text() == (tmp_path / "b" / "train.idx").read_text()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["property", "train.idx", "train.rec"]


def _payload_with_aligned_magic(header_bytes):
    """A payload whose record data holds the magic at 4-byte aligned positions (forces multi-part records)."""
    pad = (-header_bytes) % 4
    return b"x" * pad + MAGIC + b"abcd" + MAGIC + MAGIC + b"tail!"


@pytest.mark.parametrize("label", [3.0, [7.0, 1.0]])
def test_records_byte_identical_to_mxnet_writer(tmp_path, label):
    """Our framing == dmlc's, including magic splitting and padding; both readers agree."""
    hdr = 24 + (0 if isinstance(label, float) else 4 * len(label))
    payloads = [b"a", b"", b"abcde", _payload_with_aligned_magic(hdr), MAGIC, b"12" + MAGIC + b"34"]
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "m.idx"), str(tmp_path / "m.rec"), "w")
    ours = R.RecordWriter(tmp_path / "o.rec", tmp_path / "o.idx")
    for i, p in enumerate(payloads):
        w.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, label, i, 0), p))
        ours.write(i, R.pack(R.IRHeader(0, label, i, 0), p))
    w.close()
    ours.close()
    assert (tmp_path / "m.rec").read_bytes() == (tmp_path / "o.rec").read_bytes()
    assert (tmp_path / "m.idx").read_text() == (tmp_path / "o.idx").read_text()
    reader = R.FaceRecordReader(str(tmp_path / "m.rec"))
    assert reader.header0 is None  # record 0 has a payload: an image, not insightface's header
    for i, p in enumerate(payloads):
        header, payload = reader.read_header(i)
        assert payload == p
        assert reader.read(i) == (int(np.atleast_1d(label)[0]), p)
    assert reader.labels().tolist() == [int(np.atleast_1d(label)[0])] * len(payloads)


def test_face2rec2_vector_labels(tmp_path):
    """face2rec2: header id2=0, image labels [label, aligned] (flag 2); readers take label[0]."""
    labels = [0, 0, 0, 1, 1, 2]
    payloads = [bytes([k]) * (k + 3) for k in range(6)]
    n, classes = len(labels), 3
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1, n + 1 + classes], 0, 0), b""))
    for i, (lab, p) in enumerate(zip(labels, payloads), 1):
        w.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, [lab, 1], i, 0), p))
    for j, (a, b) in enumerate([(1, 4), (4, 6), (6, 7)]):
        w.write_idx(n + 1 + j, mx.recordio.pack(mx.recordio.IRHeader(0, [a, b], n + 1 + j, 0), b""))
    w.close()
    reader = R.FaceRecordReader(str(tmp_path / "train.rec"))
    assert reader.header0 == (7, 10)
    assert reader.id2range == {7: (1, 4), 8: (4, 6), 9: (6, 7)}
    assert [reader.read(i) for i in reader.imgidx] == list(zip(labels, payloads))
    header, _ = reader.read_header(4)
    assert header.flag == 2 and header.label.tolist() == [1.0, 1.0]
    assert reader.labels().tolist() == labels


def test_rec_without_header_uses_index_order(tmp_path):
    """SeqRecBuilder / shuffled recs: no header, ids from 0, keys in .idx order."""
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "s.idx"), str(tmp_path / "s.rec"), "w")
    keys = [5, 0, 3]
    for k in keys:
        w.write_idx(k, mx.recordio.pack(mx.recordio.IRHeader(0, float(k % 2), k, 0), b"img%d" % k))
    w.close()
    reader = R.FaceRecordReader(str(tmp_path / "s.rec"))
    assert reader.header0 is None and reader.id2range == {}
    assert reader.imgidx == keys
    assert [reader.read(k) for k in keys] == [(1, b"img5"), (0, b"img0"), (1, b"img3")]


def test_reader_shared_between_threads_and_pickled(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 200).tolist()
    payloads = [rng.bytes(int(rng.integers(1, 300))) for _ in labels]
    R.write_face_rec(tmp_path, zip(labels, payloads))
    reader = R.FaceRecordReader(str(tmp_path / "train.rec"))
    expected = {i: reader.read(i) for i in reader.imgidx}
    results, errors = [], []

    def work(offset):
        try:
            ids = reader.imgidx[offset:] + reader.imgidx[:offset]
            results.append(all(reader.read(i) == expected[i] for i in ids for _ in range(3)))
        except Exception as exc:  # surfaced through the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 37,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [True] * 6
    clone = pickle.loads(pickle.dumps(reader))
    assert all(clone.read(i) == expected[i] for i in clone.imgidx)
    assert sorted(p for _, p in expected.values()) == sorted(payloads)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="record file not found: .*nope.rec"):
        R.FaceRecordReader(str(tmp_path / "nope.rec"))
    R.write_face_rec(tmp_path, [(0, b"a"), (1, b"b")])
    idx = tmp_path / "train.idx"
    content = idx.read_text()
    idx.unlink()
    with pytest.raises(FileNotFoundError, match=r"index file not found: .*train\.idx"):
        R.FaceRecordReader(str(tmp_path / "train.rec"))
    idx.write_text("0\tzero\n")
    with pytest.raises(R.RecordFormatError, match=r"train\.idx line 1: '0\\tzero' is not two integers"):
        R.FaceRecordReader(str(tmp_path / "train.rec"))
    idx.write_text("0\t0\n0\t0\n")
    with pytest.raises(R.RecordFormatError, match=r"train\.idx line 2: key 0 appears twice"):
        R.FaceRecordReader(str(tmp_path / "train.rec"))
    idx.write_text(content.replace("\t0\n", "\t3\n", 1))  # record 0 at a wrong offset
    with pytest.raises(R.RecordFormatError, match="bad magic .* at byte 3"):
        R.FaceRecordReader(str(tmp_path / "train.rec"))
    idx.write_text(content)
    reader = R.FaceRecordReader(str(tmp_path / "train.rec"))
    with pytest.raises(KeyError, match="record 99 is not in"):
        reader.read(99)


def test_write_face_rec_errors(tmp_path, caplog):
    with pytest.raises(ValueError, match="item 1: label -1 is negative"):
        R.write_face_rec(tmp_path, [(0, b"a"), (-1, b"b")])
    with pytest.raises(ValueError, match=r"item 0: label '3' is not an integer"):
        R.write_face_rec(tmp_path, [("3", b"a")])
    with pytest.raises(TypeError, match="item 0: image must be encoded bytes"):
        R.write_face_rec(tmp_path, [(0, "text")])
    with pytest.raises(ValueError, match="no images given"):
        R.write_face_rec(tmp_path, [])
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    with caplog.at_level("WARNING"):
        stats = R.write_face_rec(tmp_path, [(0, b"a"), (3.0, b"b")])
    assert stats["num_classes"] == 4 and stats["missing_labels"] == [1, 2]
    assert "2 of 4 class ids have no image" in caplog.text


def test_property_read_write(tmp_path):
    R.write_property(tmp_path, 85742, 112, 112)
    assert (tmp_path / "property").read_text() == "85742,112,112\n"
    assert R.read_property(tmp_path) == (85742, (112, 112))
    (tmp_path / "property").write_text("10,112,112\n12,112,96")  # dir2rec: no newline; last line wins
    assert R.read_property(str(tmp_path)) == (12, (112, 96))
    with pytest.raises(ValueError, match="H must be a positive integer, got 0"):
        R.write_property(tmp_path, 3, 0, 112)


@pytest.mark.parametrize("content, message", [
    ("85742,112,112\n3850179\n", r"line 2: '3850179' has 1 comma-separated fields; expected exactly 3"),
    ("10,112\n", r"line 1: '10,112' has 2 comma-separated fields"),
    ("ten,112,112\n", r"line 1: 'ten,112,112' is not three integers"),
    ("\n", r"is empty; expected one line 'num_classes,H,W'"),
    ("0,112,112\n", r"line 1: '0,112,112' has a non-positive value"),
])
def test_property_errors(tmp_path, content, message):
    with pytest.raises(FileNotFoundError, match=r"property file not found: .*property"):
        R.read_property(tmp_path)
    (tmp_path / "property").write_text(content)
    with pytest.raises(R.RecordFormatError, match=message):
        R.read_property(tmp_path)


def test_inconsistent_header_errors(tmp_path):
    def write(records):
        w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "h.idx"), str(tmp_path / "h.rec"), "w")
        for k, (label, payload) in enumerate(records):
            w.write_idx(k, mx.recordio.pack(mx.recordio.IRHeader(0, label, k, 0), payload))
        w.close()

    write([([5, 2], b""), (0, b"img")])
    with pytest.raises(R.RecordFormatError, match=r"h.rec: header record 0 has label \[5, 2\]; expected 1 <="):
        R.FaceRecordReader(str(tmp_path / "h.rec"))
    write([([2, 4], b""), (0, b"img"), ([1, 2], b"")])
    with pytest.raises(R.RecordFormatError, match=r"identity records are 2..3 but record 3 is not in .*h.idx"):
        R.FaceRecordReader(str(tmp_path / "h.rec"))
    write([([2, 3], b""), (0, b"img"), (7.0, b"")])
    with pytest.raises(R.RecordFormatError, match=r"identity record 2 has label 7.0; expected \[start, end\)"):
        R.FaceRecordReader(str(tmp_path / "h.rec"))
