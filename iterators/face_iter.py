"""``FaceImageIter``: insightface's softmax-training iterator over an insightface ``.rec``.

Behaviour follows insightface's ``FaceImageIter`` (``recognition/arcface_mxnet/image_iter.py``): the
header record 0 gives the identity records, whose ``[start, end)`` labels give the image records; only
``train.rec``/``train.idx`` are needed, ``property`` is read when present.

Differences from upstream, all deliberate:

* decoding and augmentation run in worker threads with a prefetch window (``cv2.imdecode`` and
  ``os.pread`` release the GIL), while every random decision (order, mirror, colour, cutoff) is
  drawn in the calling thread from one seeded generator per epoch: batches are identical for any
  ``num_workers`` (0 = decode inline);
* ``shuffle=False`` iterates the image records in identity order (upstream reads the file
  sequentially and so also yields the header and identity records as "images");
* a label outside ``0..num_classes-1`` raises, naming the record; a record that does not decode
  is skipped, counted (``num_corrupt``) and logged;
* ``mean`` is refused: the networks normalise ``(x - 127.5) * 0.0078125`` inside the graph and
  upstream's ``mean`` path would normalise twice;
* no ``**kwargs``: unknown arguments raise ``TypeError``. ``ctx_num`` is accepted and ignored, as
  upstream's ``**kwargs`` did;
* ``num_classes`` (used to check every label) comes from the argument, else ``property``, else the
  identity records (label of each identity's first image + 1); only a ``.rec`` without header and
  without ``property`` needs the argument;
* ``state_dict()`` / ``load_state_dict()`` resume mid-epoch in O(1) (see :meth:`FaceImageIter.state_dict`).

Workers decode straight into the batch buffer (one per batch, allocated when its first sample is queued,
never reused), which is handed to MXNet without a copy (``mx.nd.from_numpy(zero_copy=True)``), so consumers may
keep batches as long as they like.
"""
import collections
import concurrent.futures
import logging
import math
import os

import cv2
import mxnet as mx
import numpy as np

from iterators import augment
from iterators.formats.recordio import FaceRecordReader, RecordFormatError, RecordLabelError, read_property
from iterators.workers import (STATE_VERSION, DecodeWorkersMixin, check_state_config, check_state_header, jsonable,
                               set_rng_state)

logger = logging.getLogger(__name__)

CUTOFF_FILL = 128  # insightface FaceImageIter fills the cut-off square with 128
_CHUNK = 8  # samples per worker task: amortises executor overhead, small enough to balance


class FaceImageIter(DecodeWorkersMixin, mx.io.DataIter):
    """Batches of RGB faces from an insightface ``.rec`` for softmax/margin training.

    Parameters
    ----------
    batch_size : int
        B, images per batch (insightface: ``per_batch_size * num_devices``).
    data_shape : (3, H, W)
        Shape of one sample; the first entry must be 3.
    path_imgrec : str
        ``train.rec``; ``train.idx`` must be beside it (``path[:-4] + '.idx'``).
    shuffle : bool
        Reshuffle the image order at every ``reset()``.
    aug_list : list of callables or None
        Extra augmenters ``f(img, rng) -> img`` on HWC RGB arrays, applied after the built-in
        ones; ``rng`` is a ``numpy.random.Generator`` seeded per sample from the iterator's
        generator (so they stay deterministic with workers). Upstream accepted and ignored it.
    mean : None
        Must be None (see module docstring); anything else raises ``ValueError``.
    rand_mirror : bool
        Horizontal flip with probability 1/2.
    cutoff : int
        Side (pixels) of a square set to 128 with probability 1/2 (0 = off).
    color_jittering : int
        0 off; 1 brightness/contrast/saturation jitter of ±0.125 in random order; >1 additionally
        JPEG re-compression (quality 2..20) with probability 1/2 first. Produces unclipped floats.
    images_filter : int
        Identities with fewer images are skipped (labels are not remapped, as upstream).
    data_name, label_name : str
        Names of the data/label inputs (``data`` / ``softmax_label``).
    num_workers : int
        Decode threads (0 = decode in the calling thread).
    seed : int or None
        Seed of order and augmentation; None = fresh entropy.
    num_classes : int or None
        C (labels must be 0..C-1). None: from the ``property`` file beside ``path_imgrec`` when present,
        else from the header's identity records (:func:`num_classes_from_identity_records`); a ``.rec``
        without header and without ``property`` needs it (``FileNotFoundError`` otherwise).
    prefetch : int
        Batches decoded ahead of the consumer.
    ctx_num : int or None
        Accepted for insightface compatibility and ignored (upstream took it through ``**kwargs``).

    Outputs
    -------
    ``next()`` returns ``mx.io.DataBatch(data=[B x 3 x H x W float32, RGB 0..255],
    label=[B float32 class ids], pad=0)``. An epoch yields ``floor(N / B)`` batches (the incomplete
    last batch is dropped, as upstream); then ``StopIteration`` until ``reset()``.

    Resume: ``state_dict()`` -> JSON-serialisable dict; ``load_state_dict(state)`` on a new iterator built
    with the same arguments continues exactly where the saved one stood (see :meth:`state_dict`).
    """

    def __init__(self, batch_size, data_shape, path_imgrec, shuffle=False, aug_list=None, mean=None,
                 rand_mirror=False, cutoff=0, color_jittering=0, images_filter=0, data_name="data",
                 label_name="softmax_label", num_workers=2, seed=None, num_classes=None, prefetch=2,
                 ctx_num=None):
        super().__init__(batch_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"FaceImageIter: batch_size must be a positive integer, got {batch_size!r}")
        data_shape = tuple(int(v) for v in data_shape)
        if len(data_shape) != 3 or data_shape[0] != 3:
            raise ValueError(f"FaceImageIter: data_shape must be (3, H, W), got {data_shape}")
        if not path_imgrec:
            raise ValueError("FaceImageIter: path_imgrec is required (path of train.rec)")
        if mean is not None:
            raise ValueError(
                f"FaceImageIter: mean={mean!r} is not supported: the network already normalises its input "
                "((x - 127.5) * 0.0078125), so subtracting a mean here would normalise twice. Pass mean=None")
        if aug_list is not None and not all(callable(a) for a in aug_list):
            raise ValueError("FaceImageIter: aug_list must be a list of callables f(img, rng) -> img")
        # bool is an int: HEAD's sample_config has data_cutoff = False, which upstream reads as 0.
        for name, value in (("cutoff", cutoff), ("color_jittering", color_jittering),
                            ("images_filter", images_filter), ("num_workers", num_workers)):
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"FaceImageIter: {name} must be a non-negative integer, got {value!r}")
        if int(prefetch) < 1:
            raise ValueError(f"FaceImageIter: prefetch must be >= 1 batch, got {prefetch!r}")
        self.batch_size = int(batch_size)
        self.data_shape = data_shape
        self.image_size = data_shape[1:]
        self.path_imgrec = os.fspath(path_imgrec)
        self.shuffle = bool(shuffle)
        self.aug_list = list(aug_list) if aug_list else []
        self.rand_mirror = bool(rand_mirror)
        self.cutoff = int(cutoff)
        self.color_jittering = int(color_jittering)
        self.images_filter = int(images_filter)
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.ctx_num = ctx_num

        self.reader = FaceRecordReader(self.path_imgrec)
        data_dir = os.path.dirname(os.path.abspath(self.path_imgrec))
        if num_classes is not None:
            self.num_classes_source = "the num_classes argument"
        elif os.path.isfile(os.path.join(data_dir, "property")):
            num_classes, prop_size = read_property(data_dir)
            self.num_classes_source = f"{data_dir}/property"
            if tuple(prop_size) != tuple(self.image_size):
                logger.warning("%s/property says images are %dx%d but data_shape is %s; images whose height "
                               "differs are resized (resize_short) and must then be %dx%d", data_dir,
                               prop_size[0], prop_size[1], data_shape, *self.image_size)
        elif self.reader.header0 is not None:
            # insightface's FaceImageIter needs only .rec/.idx: the identity records give the classes.
            num_classes = num_classes_from_identity_records(self.reader)
            self.num_classes_source = f"the identity records of {self.path_imgrec}"
            logger.info("no property file in %s: num_classes=%d from the identity records", data_dir, num_classes)
        else:
            raise FileNotFoundError(
                f"FaceImageIter: property file not found: {data_dir}/property, and {self.path_imgrec} has no "
                "insightface header (record 0 with the identity range) to derive the number of classes from; "
                "write the property file ('num_classes,H,W'), or pass num_classes explicitly")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes <= 0:
            raise ValueError(f"FaceImageIter: num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)

        self.header0 = self.reader.header0
        if self.header0 is not None:
            logger.info("header0 label %s", self.header0)
            self.id2range = {i: r for i, r in self.reader.id2range.items() if r[1] - r[0] >= self.images_filter}
            self.imgidx = [k for a, b in self.id2range.values() for k in range(a, b)]
            logger.info("id2range %d", len(self.id2range))
        else:
            if self.images_filter:
                raise ValueError(f"FaceImageIter: images_filter={images_filter} needs identity records, but "
                                 f"{self.path_imgrec} has no insightface header (record 0 with flag > 0)")
            self.id2range = {}
            self.imgidx = list(self.reader.imgidx)
        if len(self.imgidx) < self.batch_size:
            raise ValueError(
                f"FaceImageIter: {self.path_imgrec} has {len(self.imgidx)} usable images (images_filter="
                f"{self.images_filter}), fewer than batch_size={self.batch_size}: no batch can be formed")

        self.data_name, self.label_name = data_name, label_name
        self.provide_data = [mx.io.DataDesc(data_name, (self.batch_size,) + data_shape)]
        self.provide_label = [mx.io.DataDesc(label_name, (self.batch_size,))]
        self._seed_given = seed is not None
        self._entropy = np.random.SeedSequence(seed).entropy
        self._epoch = -1
        self._start_workers(self.num_workers, "FaceImageIter")
        # _pending: submitted chunks (start position in seq, length, generator state before their draws, task);
        # _ready: decoded samples of the chunk _ready_chunk = (start, length, generator state) being consumed.
        self._pending = collections.deque()
        self._ready = collections.deque()
        self._ready_chunk = None
        self._reset_slots()
        self.seq = np.asarray(self.imgidx, dtype=np.int64)
        self.cur = 0
        self.num_corrupt = 0
        self._epoch_corrupt = 0
        self._first_reason = None
        self.is_init = False
        self._batches = 0  # batches returned by next() in this epoch
        self._window = max(1, math.ceil(self.prefetch * self.batch_size / _CHUNK))

    # ------------------------------------------------------------------ DataIter contract
    def reset(self):
        """Start a new epoch: drop prefetched work, reshuffle (if ``shuffle``), restart at 0, start prefetching."""
        logger.debug("call reset()")
        self._drop_prefetched()
        self._epoch += 1
        self._start_epoch()
        self.cur = 0
        self._fill()  # decode the first batches of the epoch before the first next() asks for them

    def next(self):
        """Next ``DataBatch``; ``StopIteration`` when fewer than ``batch_size`` images remain."""
        if not self.is_init:
            self.reset()
        B = self.batch_size
        key = self._filled // B  # this batch's rows are slots key*B.. (shifted by the corrupt ones skipped)
        label = np.empty((B,), dtype=np.float32)
        i = 0
        while i < B:
            if not self._ready:
                self._fill()
                if not self._pending:
                    self._ready_chunk = None
                    if self._batches == 0 and self._epoch_corrupt:
                        raise RecordFormatError(
                            f"{self.path_imgrec}: no batch of {B} images in epoch {self._epoch}: "
                            f"{self._epoch_corrupt} of {len(self.seq)} records failed to decode (e.g. "
                            f"{self._first_reason}); rebuild the dataset (python -m iterators.tools.build_rec) or "
                            "check it (python -m iterators.tools.inspect_dataset --decode)")
                    raise StopIteration
                start, n, rng_state, task = self._pending.popleft()
                self._ready.extend(task.result() if self._executor is not None else task())
                self._ready_chunk = (start, n, rng_state)
                self._fill()
                continue
            rid, lab, slot, reason = self._ready.popleft()
            if slot is None:
                self._shift += 1
                self.num_corrupt += 1
                self._epoch_corrupt += 1
                self._first_reason = self._first_reason or reason
                n = self.num_corrupt
                # rate-limited: the first few, then at 10, 100, 1000... with the running count
                if n <= 3 or (n >= 10 and str(n).rstrip("0") == "1"):
                    logger.warning("%s record %d skipped (corrupt: %s); %d skipped so far%s", self.path_imgrec,
                                   rid, reason, n, " (further skips are summarised)" if n == 3 else "")
                continue
            if self._shift:  # after a skipped record the sample moves up to its row (rare: one row copy)
                row = slot - self._shift
                self._bufs[row // B][row % B] = self._bufs[slot // B][slot % B]
            label[i] = lab
            i += 1
            self._filled += 1
        data = self._bufs.pop(key)
        self._batches += 1
        # Zero-copy hand-over (DLPack): the workers decoded straight into `data`, a buffer of this batch only,
        # never touched again here. mx.nd.array would copy B*3*H*W floats in this thread (~5 ms for B=128).
        return mx.io.DataBatch(data=[mx.nd.from_numpy(data, zero_copy=True)], label=[mx.nd.array(label)], pad=0,
                               provide_data=self.provide_data, provide_label=self.provide_label)

    @property
    def num_batches(self):
        """Batches per epoch, ``floor(len(imgidx) / batch_size)`` (before corrupt records are skipped)."""
        return len(self.imgidx) // self.batch_size

    # ------------------------------------------------------------------ resume
    def state_dict(self):
        """Where the iterator stands, as a JSON-serialisable dict (plain ints, bools, lists, str).

        Captures the epoch (number of ``reset()`` calls - 1; -1 before the first), the cursor (batches
        returned by ``next()`` in this epoch; prefetched batches do not count), the position in the epoch's
        order of the next image to return and the generator state that draws its augmentation, the count
        of corrupt records skipped, and the construction fields that must match on load (record count,
        usable images, batch size, shape, shuffle, augmentation flags, images_filter, num_classes, seed).
        Its size does not depend on the dataset or the cursor.
        """
        if self._ready_chunk is not None and self._ready:
            start, n, rng_state = self._ready_chunk
            skip = n - len(self._ready)
        elif self._pending:
            start, _, rng_state, _ = self._pending[0]
            skip = 0
        else:
            start, rng_state, skip = self.cur, (self._rng.bit_generator.state if self.is_init else None), 0
        return {
            "type": "FaceImageIter",
            "version": STATE_VERSION,
            "config": self._state_config(),
            "entropy": int(self._entropy),
            "epoch": int(self._epoch),
            "is_init": bool(self.is_init),
            "cursor": int(self._batches),
            "position": int(start + skip),
            "rng_state": jsonable(rng_state),
            "rng_skip": int(skip),
            "num_corrupt": int(self.num_corrupt),
        }

    def load_state_dict(self, state):
        """Continue from ``state`` (from :meth:`state_dict` of an iterator built with the same arguments).

        The following ``next()`` calls return, bitwise, the batches the saved iterator would have returned
        next, and later ``reset()`` calls continue as it would have. Nothing is decoded here; the first
        ``next()`` decodes only from the saved position on (cost independent of the cursor: the epoch's
        order is recomputed from (seed, epoch), the generator state is restored). Do not call ``reset()``
        after loading to "start" the epoch: the loaded state is already inside it (``reset()`` starts the
        NEXT epoch, as it would on the saved iterator).

        An iterator built with ``seed=None`` adopts the saved seed; an explicit different seed, another
        ``.rec`` size, batch size, shape or augmentation setting raises ``ValueError`` naming the field.
        """
        check_state_header("FaceImageIter", state, STATE_VERSION)
        check_state_config("FaceImageIter", state["config"], self._state_config())
        entropy = int(state["entropy"])
        if self._seed_given and entropy != self._entropy:
            raise ValueError(f"FaceImageIter.load_state_dict: seed mismatch: the state was saved with seed {entropy} "
                             f"but this iterator has seed {self._entropy}; build it with the seed of the saved run "
                             "(or seed=None to adopt the saved one)")
        epoch, position, skip = int(state["epoch"]), int(state["position"]), int(state["rng_skip"])
        cursor = int(state["cursor"])
        if not state["is_init"] or epoch < 0:
            self._drop_prefetched()
            self._entropy, self._epoch, self.is_init, self.cur, self._batches = entropy, -1, False, 0, 0
            self.num_corrupt = int(state["num_corrupt"])
            return
        if not 0 <= position <= len(self.imgidx) or not 0 <= cursor <= self.num_batches or skip < 0:
            raise ValueError(f"FaceImageIter.load_state_dict: position {position} / cursor {cursor} out of range "
                             f"for {len(self.imgidx)} images in batches of {self.batch_size}")
        self._drop_prefetched()
        self._entropy = entropy
        self._epoch = epoch
        self._start_epoch()  # the epoch's order, from (seed, epoch)
        set_rng_state(self._rng, state["rng_state"])
        for _ in range(skip):  # draws of the images of a chunk already returned (< one chunk)
            self._draw()
        self.cur = position
        self._batches = cursor
        self.num_corrupt = int(state["num_corrupt"])

    def _state_config(self):
        return {"num_records": len(self.reader.keys), "num_images": len(self.imgidx), "batch_size": self.batch_size,
                "data_shape": list(self.data_shape), "shuffle": self.shuffle, "rand_mirror": self.rand_mirror,
                "cutoff": self.cutoff, "color_jittering": self.color_jittering, "images_filter": self.images_filter,
                "num_classes": self.num_classes, "aug_list": len(self.aug_list)}

    # ------------------------------------------------------------------ internals
    def _start_epoch(self):
        # One generator per epoch, derived from (seed, epoch): draws do not depend on how far the
        # previous epoch prefetched before reset() was called.
        self._rng = np.random.default_rng([self._entropy, self._epoch])
        if self.shuffle:
            self.seq = self._rng.permutation(np.asarray(self.imgidx, dtype=np.int64))
        self.is_init = True
        self._batches = 0
        self._epoch_corrupt = 0
        self._first_reason = None

    def _drop_prefetched(self):
        for _, _, _, task in self._pending:
            if isinstance(task, concurrent.futures.Future):
                task.cancel()
        self._pending.clear()
        self._ready.clear()
        self._ready_chunk = None
        self._reset_slots()

    def _reset_slots(self):
        # Sample k submitted since the last reset()/load_state_dict() is decoded by a worker straight into row
        # k % B of the batch buffer _bufs[k // B] (allocated when its first sample is submitted, handed to MXNet
        # with its batch, never reused). _shift counts the corrupt samples consumed since then: a good sample of
        # slot k belongs at row k - _shift; _filled counts the rows filled.
        self._bufs, self._next_slot, self._shift, self._filled = {}, 0, 0, 0

    def _fill(self):
        """Submit chunks in sequence order until the prefetch window is full (draws happen here)."""
        while len(self._pending) < self._window and self.cur < len(self.seq):
            start = self.cur
            ids = self.seq[start:start + _CHUNK].tolist()
            self.cur += len(ids)
            rng_state = self._rng.bit_generator.state
            params = [self._draw() for _ in ids]
            self._submit(start, ids, rng_state, params)

    def _submit(self, start, ids, rng_state, params):
        """Queue the decoding of ``ids`` (sequence positions ``start..``) into their batch-buffer slots."""
        B, outs = self.batch_size, []
        for slot in range(self._next_slot, self._next_slot + len(ids)):
            buf = self._bufs.get(slot // B)
            if buf is None:
                buf = self._bufs[slot // B] = np.empty((B,) + self.data_shape, dtype=np.float32)
            outs.append((slot, buf[slot % B]))
        self._next_slot += len(ids)
        if self._executor is not None:
            task = self._executor.submit(self._load_chunk, ids, params, outs)
        else:
            task = lambda: self._load_chunk(ids, params, outs)  # noqa: E731
        self._pending.append((start, len(ids), rng_state, task))

    def _draw(self):
        rng = self._rng
        mirror = bool(rng.integers(0, 2)) if self.rand_mirror else False
        color = (augment.draw_color_jitter(rng, jpeg=self.color_jittering > 1)
                 if self.color_jittering > 0 else None)
        centre = augment.draw_cutoff(rng, self.image_size, 0.5) if self.cutoff > 0 else None
        aug_seed = int(rng.integers(0, 2 ** 63)) if self.aug_list else None
        return mirror, color, centre, aug_seed

    def _load_chunk(self, ids, params, outs):
        """Worker task: decode each record into its slot -> [(rid, label, slot or None if corrupt, reason)]."""
        res = []
        for rid, p, (slot, out) in zip(ids, params, outs):
            rid, label, arr, reason = self._load(rid, p, out)
            res.append((rid, label, None if arr is None else slot, reason))
        return res

    def _load(self, rid, params, out=None):
        """Read, check, decode and augment one record -> (rid, label, CHW float32 or None, reason).

        The CHW float32 RGB image is written into ``out`` (3 x H x W) when given (else a new array). Without
        colour jitter and ``aug_list`` the image stays uint8 BGR until that final write (mirror and cutoff act
        on each channel alike, so the values are those of the RGB path bitwise).
        """
        mirror, color, centre, aug_seed = params
        where = f"{self.path_imgrec} record {rid}"
        try:
            label, payload = self.reader.read(rid)
        except RecordLabelError:
            raise  # a NaN/inf label is a dataset error, not one unreadable image
        except RecordFormatError as exc:
            return rid, None, None, str(exc)
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"{where}: label {label} is outside 0..{self.num_classes - 1} (num_classes={self.num_classes} "
                f"from {self.num_classes_source}); fix the property file or rebuild the .rec")
        try:
            img = augment.decode_bgr(payload, self.image_size, where)
        except augment.ImageDecodeError as exc:
            return rid, None, None, str(exc)
        if mirror:
            img = augment.mirror(img)
        if out is None:
            out = np.empty(self.data_shape, dtype=np.float32)
        if color is None and not self.aug_list:
            if centre is not None:
                img = augment.apply_cutoff(img, self.cutoff, centre, CUTOFF_FILL)
            return rid, label, augment.bgr_to_chw_float(img, out), None
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if color is not None:  # into a per-thread HWC buffer unless aug_list callables might keep the image
            img = augment.apply_color_jitter(
                img, color, out=None if self.aug_list else augment.thread_scratch("face_iter", img.shape))
        if centre is not None:
            img = augment.apply_cutoff(img, self.cutoff, centre, CUTOFF_FILL)
        if self.aug_list:
            rng = np.random.default_rng(aug_seed)
            for aug in self.aug_list:
                img = aug(img, rng)
        return rid, label, augment.to_chw_float(img, out), None


def num_classes_from_identity_records(reader):
    """Number of classes of an insightface ``.rec`` with header, from its identity records alone.

    Images are grouped by class and identity record ``k`` lists the images of one class, so the label of
    each identity's first image is that identity's class; C = max of those labels + 1 (at least the number
    of identity records ``I1 - I0``, as insightface's RecBuilder writes one per class). Reads one record
    header per identity (no image is decoded).
    """
    if reader.header0 is None:
        raise ValueError(f"{reader.path_imgrec} has no insightface header: the identity records are needed")
    firsts = [a for a, b in reader.id2range.values() if b > a]
    top = int(reader.labels(firsts).max()) + 1 if firsts else 0
    return max(top, reader.header0[1] - reader.header0[0])


__all__ = ["FaceImageIter", "num_classes_from_identity_records"]
