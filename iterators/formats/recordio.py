"""insightface's RecordIO dataset layout: ``train.rec`` / ``train.idx`` / ``property``
(insightface ``src/data/face2rec2.py`` and ``recognition/arcface_mxnet/common/rec_builder.py`` ``RecBuilder``).

Record format (MXNet / dmlc-core, identical bytes)
--------------------------------------------------
A ``.rec`` file is a sequence of records. Each record is::

    uint32 magic = 0xced7230a | uint32 lrec = (cflag << 29) | length | data | zero padding to 4 bytes

``cflag`` is 0 for a whole record. dmlc's writer splits a record wherever the magic number occurs
at a 4-byte aligned position of the data (cflag 1 = first part, 2 = middle, 3 = last) and the
reader re-inserts the magic between the parts. The record data is an ``IRHeader`` packed with
``struct`` format ``'IfQQ'`` (flag, label, id, id2; 24 bytes) followed by the payload; when the
label is a vector, ``flag`` = its length, the header label is 0 and the float32 label vector is
prepended to the payload (``mx.recordio.pack``). The ``.idx`` file is text, ``"<key>\\t<offset>\\n"``.

insightface layout (RecBuilder / face2rec2)
-------------------------------------------
* record 0: header, flag > 0, label ``[I0, I1]``: ``I0 = 1 + number of images`` (first identity
  record) and ``I1 = I0 + number of identities``;
* records ``1 .. I0-1``: images grouped by class, label = class id (scalar for RecBuilder,
  ``[class, aligned]`` for face2rec2; readers take ``label[0]``);
* records ``I0 .. I1-1``: one per identity, empty payload, label ``[start, end)`` of its images;
* ``property``: one line ``"num_classes,H,W"``.

This module reads and writes both levels in pure Python (``os.pread``), so readers are safe to
share between threads, need no MXNet import, and the tests cross-check every byte with
``mx.recordio``.
"""
import collections
import logging
import os
import struct

import numpy as np

from iterators.formats.atomic import (PRIVATE_FILE, atomic_write_text, check_output_file, check_output_name,
                                      temp_path)

logger = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"  # == MXNet's native 'IfQQ' on little-endian hosts (no padding: 4+4+8+8)
_IR_SIZE = struct.calcsize(_IR_FORMAT)
_FLOAT32_EXACT = 1 << 24  # largest range of integers float32 represents exactly

IRHeader = collections.namedtuple("IRHeader", ["flag", "label", "id", "id2"])
"""Record header as ``mx.recordio.IRHeader``: ``label`` is a float, or a float32 array when flag > 0."""


class RecordFormatError(ValueError):
    """A ``.rec``/``.idx``/``property`` file that does not follow the format (the message says where)."""


class RecordLabelError(RecordFormatError):
    """A record whose label is not a finite number (NaN/inf): the dataset is wrong, not one image."""


def _finite_label(value, where):
    """``value`` (a label read from a record) as float; RecordLabelError naming ``where`` when NaN/inf."""
    value = float(value)
    if not np.isfinite(value):
        raise RecordLabelError(f"{where}: label {value} is not a finite number (NaN/inf in the record header); "
                               "rebuild the .rec with integer class ids")
    return value


# ----------------------------------------------------------------------------------- property file
def read_property(data_dir):
    """Read ``<data_dir>/property`` (``"num_classes,H,W"``) as insightface's ``load_property`` does.

    Every non-empty line must have exactly three comma-separated integers; the last line wins
    (upstream behaviour). Returns ``(num_classes, (H, W))``.

    Raises
    ------
    FileNotFoundError
        The file does not exist (message names the path and how to create it).
    RecordFormatError
        A line without exactly 3 fields, a non-integer field, or no line at all.
    """
    path = os.path.join(os.fspath(data_dir), "property")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"property file not found: {path}; it must contain one line 'num_classes,H,W' "
            "(e.g. '85742,112,112'); write it with iterators.formats.recordio.write_property or "
            "python -m iterators.tools.build_rec")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordFormatError(f"{path}: byte {exc.start} ({raw[exc.start:exc.start + 1]!r}) is not UTF-8 text; "
                                "expected one line 'num_classes,H,W'") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise RecordFormatError(f"{path} is empty; expected one line 'num_classes,H,W'")
    result = None
    for lineno, line in enumerate(lines, 1):
        fields = line.split(",")
        if len(fields) != 3:
            raise RecordFormatError(
                f"{path} line {lineno}: {line!r} has {len(fields)} comma-separated fields; expected "
                "exactly 3 ('num_classes,H,W'). A 4-line property written by rec2shufrec.py is not "
                "readable by insightface either: keep only its first line")
        try:
            num_classes, h, w = (int(x) for x in fields)
        except ValueError:
            raise RecordFormatError(
                f"{path} line {lineno}: {line!r} is not three integers 'num_classes,H,W'") from None
        if num_classes <= 0 or h <= 0 or w <= 0:
            raise RecordFormatError(f"{path} line {lineno}: {line!r} has a non-positive value")
        result = (num_classes, (h, w))
    return result


def write_property(data_dir, num_classes, H, W):
    """Write ``<data_dir>/property`` as ``"C,H,W\\n"`` (RecBuilder's format), atomically."""
    for name, value in (("num_classes", num_classes), ("H", H), ("W", W)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"write_property({data_dir}): {name} must be a positive integer, got {value!r}")
    data_dir = os.fspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    atomic_write_text(os.path.join(data_dir, "property"), "%d,%d,%d\n" % (num_classes, H, W), mode=PRIVATE_FILE)




# ----------------------------------------------------------------------------------- pack / unpack
def pack(header, payload=b""):
    """``mx.recordio.pack``: IRHeader + payload -> record bytes.

    A numeric ``header.label`` is stored in the header (flag forced to 0); a sequence label is
    stored as float32 in front of the payload with ``flag = len(label)``.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"pack: payload must be bytes, got {type(payload).__name__}")
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(_IR_FORMAT, 0, float(label), int(header.id), int(header.id2)) + bytes(payload)
    vec = np.asarray(label, dtype=np.float32).ravel()
    return (struct.pack(_IR_FORMAT, vec.size, 0.0, int(header.id), int(header.id2))
            + vec.tobytes() + bytes(payload))


def unpack(record):
    """``mx.recordio.unpack``: record bytes -> (IRHeader, payload bytes)."""
    if len(record) < _IR_SIZE:
        raise RecordFormatError(f"record of {len(record)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    flag, label, rid, rid2 = struct.unpack_from(_IR_FORMAT, record)
    offset = _IR_SIZE
    if flag > 0:
        end = offset + 4 * flag
        if len(record) < end:
            raise RecordFormatError(f"record header announces a {flag}-float label but the record has "
                                    f"only {len(record)} bytes")
        label = np.frombuffer(record, dtype=np.float32, count=flag, offset=offset).copy()
        offset = end
    return IRHeader(flag, label, rid, rid2), bytes(record[offset:])


def label_of(header):
    """Class label of a record as insightface reads it: the scalar label, or ``label[0]``."""
    if header.flag > 0:
        return header.label[0]
    return header.label


# ----------------------------------------------------------------------------------- raw records
def encode_record(data):
    """Frame ``data`` as dmlc's ``RecordIOWriter::WriteRecord`` does (magic splits, 4-byte padding)."""
    data = bytes(data)
    n = len(data)
    if n >= 1 << 29:
        raise ValueError(f"RecordIO records must be < 2^29 bytes, got {n}")
    out = []
    start = 0
    pos = data.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= (n >> 2) << 2:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            out.append(_MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (pos - start)) + data[start:pos])
            start = pos + 4
            pos = data.find(_MAGIC_BYTES, start)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start != 0 else 0
    out.append(_MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (n - start)) + data[start:])
    out.append(b"\0" * (((n + 3) & ~3) - n))
    return b"".join(out)


class RecordWriter:
    """Indexed RecordIO writer (``mx.recordio.MXIndexedRecordIO(idx, rec, 'w')`` equivalent).

    Records go to ``path_rec``; ``close()`` writes ``"<key>\\t<offset>\\n"`` lines to ``path_idx``
    in write order. ``overwrite(key, data)`` rewrites an already written record in place when the
    new framing has exactly the same length (used for the insightface header record 0, whose
    content is only known at the end).
    """

    def __init__(self, path_rec, path_idx):
        self.path_rec, self.path_idx = os.fspath(path_rec), os.fspath(path_idx)
        self._f = open(self.path_rec, "wb")
        self._index = {}
        self._keys = []

    def write(self, key, data):
        """Append one record with integer ``key``; returns its byte offset."""
        if key in self._index:
            raise ValueError(f"{self.path_rec}: record key {key} written twice")
        offset = self._f.tell()
        self._f.write(encode_record(data))
        self._index[key] = offset
        self._keys.append(key)
        return offset

    def overwrite(self, key, data):
        framed = encode_record(data)
        offset = self._index[key]
        next_offsets = [o for o in self._index.values() if o > offset]
        end = min(next_offsets) if next_offsets else self._f.tell()
        if end - offset != len(framed):
            raise ValueError(f"{self.path_rec}: cannot overwrite record {key} ({end - offset} bytes) "
                             f"with {len(framed)} bytes")
        here = self._f.tell()
        self._f.seek(offset)
        self._f.write(framed)
        self._f.seek(here)

    def close(self):
        if self._f is None:
            return
        self._f.close()
        self._f = None
        with open(self.path_idx, "w", encoding="utf-8") as f:
            f.writelines("%d\t%d\n" % (k, self._index[k]) for k in self._keys)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._f is not None:
            self._f.close()
            self._f = None


def read_index(path_idx):
    """Parse a ``.idx`` file -> (list of keys in file order, dict key -> byte offset)."""
    keys, offsets = [], {}
    with open(path_idx, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise RecordFormatError(f"{path_idx} line {lineno}: {line!r} is not '<key>\\t<offset>'")
            try:
                key, off = int(fields[0]), int(fields[1])
            except ValueError:
                raise RecordFormatError(f"{path_idx} line {lineno}: {line!r} is not two integers") from None
            if key in offsets:
                raise RecordFormatError(f"{path_idx} line {lineno}: key {key} appears twice")
            keys.append(key)
            offsets[key] = off
    return keys, offsets


def _read_index_arrays(path_idx):
    """``.idx`` -> (keys int64[N], offsets int64[N]) in file order.

    Parses with numpy (an MS1M index has 3.9 M lines); on any irregularity falls back to
    ``read_index``, whose error names the offending line.
    """
    with open(path_idx, "rb") as f:
        raw = f.read()
    num_lines = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
    try:
        table = np.array(raw.split(), dtype=np.int64)
    except ValueError:
        table = None
    # Two integers per line, tab-separated (what MXNet writes and reads); anything else -> slow path.
    if table is None or table.size != 2 * num_lines or raw.count(b"\t") != num_lines:
        keys, offsets = read_index(path_idx)
        return np.array(keys, np.int64), np.array([offsets[k] for k in keys], np.int64)
    table = table.reshape(-1, 2)
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    if np.unique(keys).size != keys.size:
        read_index(path_idx)  # raises, naming the duplicated key's line
    return keys, offsets


def read_record_at(fd, offset, path="<rec>", size_hint=0):
    """Read the record starting at byte ``offset`` of the open file descriptor ``fd``.

    Thread-safe (``os.pread`` has no shared file position). ``size_hint`` (e.g. the distance to
    the next offset of the index) lets the common whole-record case finish in one system call.
    """
    parts = []
    pos = offset
    while True:
        head = os.pread(fd, max(8, size_hint), pos)
        if len(head) < 8:
            raise RecordFormatError(f"{path}: truncated record header at byte {pos}")
        magic, lrec = struct.unpack_from("<II", head)
        if magic != MAGIC:
            raise RecordFormatError(f"{path}: bad magic 0x{magic:08x} at byte {pos} (not a RecordIO "
                                    "record; is the .idx from another .rec?)")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if len(head) >= 8 + length:
            data = head[8:8 + length]
        else:
            data = head[8:] + os.pread(fd, 8 + length - len(head), pos + len(head))
        if len(data) != length:
            raise RecordFormatError(f"{path}: record at byte {pos} announces {length} bytes, file ends after "
                                    f"{len(data)}")
        parts.append(data)
        if cflag in (0, 3):
            break
        pos += 8 + ((length + 3) & ~3)
        size_hint = 0
    return _MAGIC_BYTES.join(parts)


# ----------------------------------------------------------------------------------- reader
class FaceRecordReader:
    """Random-access reader of an insightface ``.rec`` (with or without the header record).

    Parameters
    ----------
    path_imgrec : str
        Path of ``<name>.rec``; the index is ``path_imgrec[:-4] + '.idx'`` as in insightface.

    Attributes
    ----------
    header0 : (int, int) or None
        ``(I0, I1)`` of the header record, None for a rec without header.
    id2range : dict int -> (int, int)
        Identity record id -> ``[start, end)`` image record ids (empty without header).
    imgidx : list of int
        Image record ids: the identity ranges concatenated in identity order, or every key of the
        index in file order when there is no header.
    num_images : int
        ``len(imgidx)``.

    Notes
    -----
    Reads use ``os.pread`` on one descriptor, so one reader may be shared by any number of threads.
    Pickling reopens the file (for process pools).
    """

    def __init__(self, path_imgrec):
        self.path_imgrec = os.fspath(path_imgrec)
        self.path_imgidx = self.path_imgrec[:-4] + ".idx"
        if not os.path.isfile(self.path_imgrec):
            raise FileNotFoundError(f"record file not found: {self.path_imgrec}")
        if not self.path_imgrec.endswith(".rec"):
            raise ValueError(f"{self.path_imgrec}: expected a path ending in '.rec' (the index is derived "
                             "as path[:-4] + '.idx')")
        if not os.path.isfile(self.path_imgidx):
            raise FileNotFoundError(
                f"index file not found: {self.path_imgidx} (needed beside {self.path_imgrec}); an indexed "
                "RecordIO needs both. Rebuild with python -m iterators.tools.build_rec or mx.recordio.MXIndexedRecordIO")
        self._keys, self._offsets = _read_index_arrays(self.path_imgidx)
        n = self._keys.size
        # Key -> row of the index. insightface/MXNet indexes are 0..N-1 in order: then the key is the row.
        self._row = None if np.array_equal(self._keys, np.arange(n)) else dict(zip(self._keys.tolist(), range(n)))
        # Bytes from each record to the next one (capped): lets a read finish in one pread.
        order = np.argsort(self._offsets, kind="stable")
        starts = self._offsets[order]
        ends = np.append(starts[1:], os.path.getsize(self.path_imgrec))
        self._hint = np.empty(n, np.int64)
        self._hint[order] = np.clip(ends - starts, 0, 1 << 20)
        self._fd = os.open(self.path_imgrec, os.O_RDONLY)
        self._load_layout()

    @property
    def keys(self):
        """Record ids in ``.idx`` order (``MXIndexedRecordIO.keys``)."""
        return self._keys.tolist()

    def __contains__(self, idx):
        try:
            self._row_of(idx)
        except KeyError:
            return False
        return True

    def _row_of(self, idx):
        idx = int(idx)
        if self._row is None:
            if 0 <= idx < self._keys.size:
                return idx
            raise KeyError(idx)
        return self._row[idx]

    def _load_layout(self):
        self.header0 = None
        self.id2range = {}
        if not self._keys.size:
            raise RecordFormatError(f"{self.path_imgidx} is empty: the record file holds no records")
        header, payload = self.read_header(0) if 0 in self else (None, None)
        # insightface's header is record 0 with a vector label and no payload. A record 0 with a
        # vector label *and* a payload is an image of a headerless multi-label rec (im2rec);
        # upstream would misread it as a header.
        if header is not None and header.flag > 0 and not payload:
            if header.flag < 2:
                raise RecordFormatError(f"{self.path_imgrec}: header record 0 has label {header.label}; "
                                        "expected [first_identity_record, end_identity_record]")
            where = f"{self.path_imgrec} header record 0"
            i0, i1 = (int(_finite_label(v, where)) for v in header.label[:2])
            if not 1 <= i0 <= i1:
                raise RecordFormatError(f"{self.path_imgrec}: header record 0 has label [{i0}, {i1}]; expected "
                                        "1 <= first_identity_record <= end_identity_record")
            self.header0 = (i0, i1)
            imgidx = []
            for identity in range(i0, i1):
                if identity not in self:
                    raise RecordFormatError(
                        f"{self.path_imgrec}: header says identity records are {i0}..{i1 - 1} but record "
                        f"{identity} is not in {self.path_imgidx}")
                h, _ = self.read_header(identity)
                if h.flag < 2:
                    raise RecordFormatError(
                        f"{self.path_imgrec}: identity record {identity} has label {h.label}; expected "
                        "[start, end) (was this .rec written without insightface's identity records?)")
                where = f"{self.path_imgrec} identity record {identity}"
                a, b = (int(_finite_label(v, where)) for v in h.label[:2])
                self.id2range[identity] = (a, b)
                imgidx.extend(range(a, b))
            self.imgidx = imgidx
        else:
            self.imgidx = self.keys
        self.num_images = len(self.imgidx)

    def __len__(self):
        return self.num_images

    def read_raw(self, idx):
        """Record bytes (IRHeader + payload) of record id ``idx``."""
        try:
            row = self._row_of(idx)
        except KeyError:
            raise KeyError(f"{self.path_imgrec}: record {idx} is not in {self.path_imgidx}") from None
        return read_record_at(self._fd, int(self._offsets[row]), self.path_imgrec, int(self._hint[row]))

    def read_header(self, idx):
        """``(IRHeader, payload)`` of record ``idx``."""
        try:
            return unpack(self.read_raw(idx))
        except RecordFormatError as exc:
            raise RecordFormatError(f"{self.path_imgrec} record {idx}: {exc}") from None

    def read(self, idx):
        """``(label, payload)`` of image record ``idx``; label = header label or ``label[0]`` as int."""
        header, payload = self.read_header(idx)
        return int(_finite_label(label_of(header), f"{self.path_imgrec} record {idx}")), payload

    def labels(self, indices=None):
        """Integer labels of ``indices`` (default ``imgidx``) as an int64 array (reads headers only)."""
        indices = self.imgidx if indices is None else indices
        out = np.empty(len(indices), dtype=np.int64)
        for n, idx in enumerate(indices):
            try:
                offset = int(self._offsets[self._row_of(idx)])
            except KeyError:
                raise KeyError(f"{self.path_imgrec}: record {idx} is not in {self.path_imgidx}") from None
            head = os.pread(self._fd, 8 + _IR_SIZE + 4, offset)
            lrec = struct.unpack_from("<I", head, 4)[0] if len(head) >= 8 else 0
            if len(head) < 8 + _IR_SIZE + 4 or (lrec >> 29) != 0:
                out[n] = self.read(idx)[0]
                continue
            flag, label = struct.unpack_from("<If", head, 8)
            if flag > 0:
                label = struct.unpack_from("<f", head, 8 + _IR_SIZE)[0]
            out[n] = int(_finite_label(label, f"{self.path_imgrec} record {idx}"))
        return out

    def class_ranges(self, images_filter=0):
        """Identity ranges kept by ``images_filter``: list of (identity_id, start, end) with end-start >= filter."""
        return [(i, a, b) for i, (a, b) in self.id2range.items() if b - a >= images_filter]

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = os.open(self.path_imgrec, os.O_RDONLY)


# ----------------------------------------------------------------------------------- writer
def _check_label(label, where):
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        if isinstance(label, (float, np.floating)) and float(label).is_integer():
            label = int(label)
        else:
            raise ValueError(f"{where}: label {label!r} is not an integer class id")
    if label < 0:
        raise ValueError(f"{where}: label {label} is negative; class ids are 0..num_classes-1")
    return int(label)


def write_face_rec(out_dir, items, image_size=(112, 112), prefix="train"):
    """Write images in insightface's layout: ``<out_dir>/<prefix>.rec/.idx`` and ``property``.

    Parameters
    ----------
    out_dir : str
        Output directory (created).
    items : iterable of (int, bytes)
        ``(class label, encoded image)``. Labels should be 0..C-1; images are grouped by label
        (ascending; the input order is kept within a class). Input already grouped in ascending
        label order is streamed; otherwise a temporary rec is written and re-ordered, so memory
        stays O(number of images) for the offsets only.
    image_size : (int, int)
        (H, W) written to ``property``.
    prefix : str
        Base name of the rec/idx pair.

    Returns
    -------
    dict
        ``path_imgrec, path_imgidx, path_property, num_images, num_classes (= max label + 1),
        num_identities (classes with >= 1 image), header0 (I0, I1), missing_labels``.

    Notes
    -----
    Record ids and headers follow RecBuilder: record 0 ``IRHeader(flag=2, label=[I0, I1], id=0,
    id2=1)``; image ``k`` (1-based) ``IRHeader(0, label, id=k, id2=0)``; identity ``j``
    ``IRHeader(2, [start, end], id=I0+j, id2=0)``. The files appear atomically (written to
    temporary names, then renamed) once everything succeeded.
    """
    out_dir = os.fspath(out_dir)
    check_output_name(prefix, "prefix")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output {out_dir} exists and is not a directory; train.rec/.idx/property are written into "
                         "a directory")
    for existing in (os.path.join(out_dir, prefix + ".rec"),):
        if os.path.isdir(existing):
            raise ValueError(f"output {existing} is a directory")
        check_output_file(existing, _MAGIC_BYTES, "a RecordIO file")
    os.makedirs(out_dir, exist_ok=True)
    H, W = (int(v) for v in image_size)
    path_rec = os.path.join(out_dir, prefix + ".rec")
    path_idx = os.path.join(out_dir, prefix + ".idx")
    tmp_rec, tmp_idx = temp_path(out_dir, ".rec"), temp_path(out_dir, ".idx")
    stage_rec, stage_idx = temp_path(out_dir, ".stage.rec"), temp_path(out_dir, ".stage.idx")
    # Header placeholder: same framed size whatever I0/I1 are (2 float32 labels, no magic inside).
    placeholder = pack(IRHeader(0, [0.0, 0.0], 0, 1))
    labels = []
    writer = None
    try:
        writer = RecordWriter(tmp_rec, tmp_idx)
        writer.write(0, placeholder)
        in_order = True
        for n, (label, payload) in enumerate(items):
            label = _check_label(label, f"write_face_rec({out_dir}) item {n}")
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise TypeError(f"write_face_rec({out_dir}) item {n}: image must be encoded bytes, "
                                f"got {type(payload).__name__}")
            if labels and label < labels[-1]:
                in_order = False
            key = len(labels) + 1
            writer.write(key, pack(IRHeader(0, label, key, 0), payload))
            labels.append(label)
        if not labels:
            raise ValueError(f"write_face_rec({out_dir}): no images given")
        labels = np.array(labels, dtype=np.int64)
        if not in_order:
            # Input not grouped by ascending label: re-read the staged records in (stable) label order.
            writer.close()
            os.replace(tmp_rec, stage_rec)
            os.replace(tmp_idx, stage_idx)
            offsets = read_index(stage_idx)[1]
            order = np.argsort(labels, kind="stable")
            writer = RecordWriter(tmp_rec, tmp_idx)
            writer.write(0, placeholder)
            fd = os.open(stage_rec, os.O_RDONLY)
            try:
                for new_key, k in enumerate(order.tolist(), 1):
                    _, payload = unpack(read_record_at(fd, offsets[k + 1], stage_rec))
                    writer.write(new_key, pack(IRHeader(0, int(labels[k]), new_key, 0), payload))
            finally:
                os.close(fd)
            labels = labels[order]
        num_images = len(labels)
        i0 = num_images + 1
        present, starts = np.unique(labels, return_index=True)
        if i0 + len(present) > _FLOAT32_EXACT:
            # Header/identity labels are float32 (mx.recordio.pack): record ids above 2^24 are not exact.
            raise ValueError(f"write_face_rec({out_dir}): {num_images} images + {len(present)} identities exceed "
                             f"the {_FLOAT32_EXACT} record ids insightface's float32 labels can address; split "
                             "the dataset")
        ends = np.append(starts[1:], num_images)
        for j, (a, b) in enumerate(zip(starts, ends)):
            writer.write(i0 + j, pack(IRHeader(0, [float(a + 1), float(b + 1)], i0 + j, 0)))
        i1 = i0 + len(present)
        writer.overwrite(0, pack(IRHeader(0, [float(i0), float(i1)], 0, 1)))
        writer.close()
        num_classes = int(labels.max()) + 1
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        if missing:
            logger.warning("write_face_rec(%s): %d of %d class ids have no image (e.g. %s); labels should be "
                           "consecutive 0..C-1", out_dir, len(missing), num_classes, missing[:5])
        os.replace(tmp_rec, path_rec)
        os.replace(tmp_idx, path_idx)
        write_property(out_dir, num_classes, H, W)
    finally:
        if writer is not None and writer._f is not None:  # failed half-way: release the file before removing it
            writer._f.close()
        for p in (tmp_rec, tmp_idx, stage_rec, stage_idx):
            if os.path.exists(p):
                os.unlink(p)
    logger.info("wrote %s: %d images, %d identities, property %d,%d,%d", path_rec, num_images, len(present),
                num_classes, H, W)
    return {
        "path_imgrec": path_rec,
        "path_imgidx": path_idx,
        "path_property": os.path.join(out_dir, "property"),
        "num_images": num_images,
        "num_classes": num_classes,
        "num_identities": int(len(present)),
        "header0": (i0, i1),
        "missing_labels": missing,
    }


__all__ = ["IRHeader", "RecordFormatError", "RecordLabelError", "read_property", "write_property", "pack", "unpack", "label_of",
           "encode_record", "RecordWriter", "read_index", "read_record_at", "FaceRecordReader",
           "write_face_rec"]
