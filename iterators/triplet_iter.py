"""``TripletFaceImageIter``: insightface's online triplet-mining iterator.

Behaviour follows insightface's ``FaceImageIter`` in triplet mode (``recognition/arcface_mxnet/
triplet_image_iter.py``: ``triplet_reset``, ``select_triplets``, ``pick_triplets``, ``next``).

At every ``reset()`` (so at the first ``next()`` and after every epoch) the iterator

1. takes the next bag of ``bag_size`` images from a pool in which identities come in random order
   with at most ``images_per_identity`` images each (the pool is rebuilt when it runs out);
2. embeds the bag with the CURRENT weights of the Module being trained (``forward(is_train=False)``
   in chunks of ``batch_size``; ``outputs[0]`` is the embedding), L2-normalises the rows;
3. mines FaceNet semi-hard triplets with :func:`iterators.triplet_mining.pick_triplets`;
4. lays the triplets out so that every device slice of ``per_batch_size = batch_size / ctx_num``
   images is ``[T anchors | T positives | T negatives]`` with ``T = per_batch_size // 3``, the layout
   the ``triplet``/``atriplet`` loss slices (insightface ``recognition/arcface_mxnet/train.py``
   ``get_symbol``, triplet branch);

and repeats 1-4 until at least two global batches are queued (upstream's ``seq_min_size``).
``next()`` then decodes the queued images (``rand_mirror``: flip with p = 1/2; ``cutoff`` > 0: a square
of that side filled with 127.5 on EVERY image, as upstream's triplet ``next`` does).

Deliberate differences from upstream: per-device batch not divisible by 3, ``bag_size`` not a
multiple of the global batch, ``images_per_identity < 2``, a rec without identity records, or a
pool smaller than one bag raise ``ValueError`` naming the values and the fix (upstream misaligns
the slices, crashes or asserts); identities are shuffled as lists (upstream's
``random.shuffle(range(...))`` fails on Python 3); when the model separates the data so well that
a whole pass over the pool does not yield two batches, the iterator continues with what it has
(one batch at least, with a warning) or raises ``NoTripletsError`` instead of mining forever. Every
random decision comes from one ``numpy.random.Generator`` seeded by ``seed``. ``state_dict()`` /
``load_state_dict()`` resume mid-epoch without decoding, embedding or mining anything.
"""
import zlib
import logging
import os
import time

import mxnet as mx
import numpy as np

from iterators import augment
from iterators.formats.recordio import FaceRecordReader
from iterators.triplet_mining import pick_triplets
from iterators.workers import (STATE_VERSION, DecodeWorkersMixin, check_state_config, check_state_header, jsonable,
                               rng_state_to_json, set_rng_state)

logger = logging.getLogger(__name__)

# insightface's triplet mode fills the cut-off square with 127.5 (softmax mode: 128), always.
TRIPLET_CUTOFF_FILL = 127.5
# Upstream queues at least two global batches per mining round so that every epoch has >= 2 batches.
MIN_BATCHES_PER_ROUND = 2
# Bags mined in one round before giving up on reaching MIN_BATCHES_PER_ROUND, in passes over the pool.
MAX_POOL_PASSES = 2
_DECODE_CHUNK = 16  # images per decode task (amortises executor overhead)


class NoTripletsError(RuntimeError):
    """Mining found no full batch of semi-hard triplets in two passes over the data."""


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"TripletFaceImageIter: {name} must be a positive integer, got {value!r}")
    return int(value)


def l2_normalize_rows(x):
    """Row-wise L2 normalisation as ``sklearn.preprocessing.normalize`` (all-zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def run_lengths(labels):
    """Sizes of the runs of consecutive equal labels (the class blocks ``pick_triplets`` expects)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    starts = np.concatenate(([0], np.flatnonzero(labels[1:] != labels[:-1]) + 1, [labels.size]))
    return np.diff(starts).tolist()


class TripletFaceImageIter(DecodeWorkersMixin, mx.io.DataIter):
    """Triplet batches mined online with the weights of the Module being trained.

    Parameters
    ----------
    batch_size : int
        Global batch B = ``per_batch_size * ctx_num``.
    data_shape : (3, H, W)
    path_imgrec : str
        insightface ``train.rec`` with header and identity records (``train.idx`` beside it).
    shuffle : bool
        Identities (and the images of each identity) in random order in the pool (upstream requires
        True; False keeps record order, for tests and debugging).
    rand_mirror : bool
        Horizontal flip with probability 1/2 (training batches only, never while embedding a bag).
    cutoff : int
        Side of the square filled with 127.5 on every training image (0 = off).
    ctx_num : int
        Number of devices the Module slices the batch over.
    images_per_identity : int
        At most this many images per identity in the pool (>= 2; insightface 5).
    triplet_params : (bag_size, alpha, max_ap)
        Images embedded per mining round (a multiple of ``batch_size``; insightface 7200), the margin
        alpha (0 <= alpha <= 1, as upstream asserts) and the ``max_ap`` cut (0 = off).
    mx_model : mx.mod.Module or callable
        The Module being trained (bound with ``data`` of shape (B, 3, H, W)); its ``outputs[0]`` after
        ``forward(is_train=False)`` is the embedding. A callable ``f(data) -> (B, D) array`` taking a
        float32 (B, 3, H, W) numpy batch may be given instead.
    data_name, label_name : str
    seed : int or None
        Seed of the pool order, triplet choice and augmentation (None = fresh entropy).
    num_workers : int
        Decode threads (0 = decode in the calling thread); results do not depend on it.

    Attributes
    ----------
    bag_stats : list of dict
        One JSON-serialisable dict per mined bag, appended when the bag is mined: ``round`` (the mining
        round, i.e. the epoch: number of ``reset()`` calls - 1), ``bag`` (bags mined before it by this
        iterator's run, counting those before a loaded state), ``images``, ``identities``, ``pairs``
        (within-identity (a, p) pairs), ``triplets``, ``embed_seconds``, ``mine_seconds``. After
        ``load_state_dict`` it holds the saved round's bags.
    seq : list of int
        Record ids queued for the current epoch (consecutive chunks of ``per_batch_size`` are
        ``[anchors | positives | negatives]``).

    Outputs
    -------
    ``DataBatch(data=[B x 3 x H x W float32 RGB 0..255], label=[B float32 identity labels], pad=0)``;
    ``floor(len(seq) / B)`` batches per epoch, then ``StopIteration`` until ``reset()``.
    """

    def __init__(self, batch_size, data_shape, path_imgrec, shuffle=True, rand_mirror=False, cutoff=0, ctx_num=1,
                 images_per_identity=5, triplet_params=(7200, 0.3, 0.0), mx_model=None, data_name="data",
                 label_name="softmax_label", seed=None, num_workers=2):
        super().__init__(batch_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.ctx_num = _positive_int("ctx_num", ctx_num)
        if self.batch_size % self.ctx_num:
            raise ValueError(f"TripletFaceImageIter: batch_size={batch_size} is not divisible by ctx_num={ctx_num}; "
                             "the global batch must be per_batch_size * number of devices")
        self.per_batch_size = self.batch_size // self.ctx_num
        if self.per_batch_size % 3:
            raise ValueError(
                f"TripletFaceImageIter: per-device batch {self.per_batch_size} (batch_size {batch_size} / ctx_num "
                f"{ctx_num}) is not divisible by 3; each device slice is [anchors|positives|negatives] of "
                f"per_batch_size // 3 rows, so use e.g. --per-batch-size {3 * max(1, self.per_batch_size // 3)}")
        data_shape = tuple(int(v) for v in data_shape)
        if len(data_shape) != 3 or data_shape[0] != 3:
            raise ValueError(f"TripletFaceImageIter: data_shape must be (3, H, W), got {data_shape}")
        if not path_imgrec:
            raise ValueError("TripletFaceImageIter: path_imgrec is required (path of train.rec)")
        self.images_per_identity = _positive_int("images_per_identity", images_per_identity)
        if self.images_per_identity < 2:
            raise ValueError(f"TripletFaceImageIter: images_per_identity={images_per_identity}; triplets need an "
                             "anchor and a positive of the same identity, so it must be >= 2 (insightface: 5)")
        if triplet_params is None or len(triplet_params) != 3:
            raise ValueError(f"TripletFaceImageIter: triplet_params must be [bag_size, alpha, max_ap], "
                             f"got {triplet_params!r}")
        bag_size, alpha, max_ap = triplet_params
        self.bag_size = _positive_int("triplet bag_size", bag_size)
        if self.bag_size % self.batch_size:
            raise ValueError(
                f"TripletFaceImageIter: triplet_bag_size={bag_size} is not a multiple of the global batch "
                f"{self.batch_size} (the bag is embedded in chunks of one batch); use e.g. "
                f"{max(1, self.bag_size // self.batch_size) * self.batch_size}")
        self.alpha, self.max_ap = float(alpha), float(max_ap)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TripletFaceImageIter: triplet_alpha={alpha} must be in [0, 1] (insightface 0.3, "
                             "atriplet 0.35)")
        if self.max_ap < 0:
            raise ValueError(f"TripletFaceImageIter: triplet_max_ap={max_ap} must be >= 0 (0 = no cut)")
        if mx_model is None:
            raise ValueError("TripletFaceImageIter: mx_model is required: the Module being trained (bags are "
                             "embedded with its current weights)")
        self.mx_model = mx_model
        self.data_shape = data_shape
        self.image_size = data_shape[1:]
        self.path_imgrec = os.fspath(path_imgrec)
        self.shuffle = bool(shuffle)
        self.rand_mirror = bool(rand_mirror)
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, np.integer)) or cutoff < 0:
            raise ValueError(f"TripletFaceImageIter: cutoff must be a non-negative integer, got {cutoff!r}")
        self.cutoff = int(cutoff)

        self.reader = FaceRecordReader(self.path_imgrec)
        if self.reader.header0 is None:
            raise ValueError(
                f"TripletFaceImageIter: {self.path_imgrec} has no insightface header (record 0 with the identity "
                "range); triplet mining needs the identity records. Rebuild it with "
                "python -m iterators.tools.build_rec")
        self.header0 = self.reader.header0
        self.id2range = dict(self.reader.id2range)
        logger.info("header0 label %s", self.header0)
        logger.info("id2range %d", len(self.id2range))
        pool_size = sum(min(b - a, self.images_per_identity) for a, b in self.id2range.values())
        if pool_size < self.bag_size:
            raise ValueError(
                f"TripletFaceImageIter: triplet_bag_size={self.bag_size} but {self.path_imgrec} gives only "
                f"{pool_size} images with at most images_per_identity={self.images_per_identity} per identity; "
                f"lower triplet_bag_size to a multiple of {self.batch_size} <= {pool_size}")
        self.pool_size = pool_size
        self.bags_per_pass = max(1, pool_size // self.bag_size)
        self._labels = {}

        self.data_name, self.label_name = data_name, label_name
        self.provide_data = [mx.io.DataDesc(data_name, (self.batch_size,) + data_shape)]
        self.provide_label = [mx.io.DataDesc(label_name, (self.batch_size,))]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"TripletFaceImageIter: seed must be an integer or None, got {seed!r}")
        self._seed = None if seed is None else int(seed)
        self._rng = np.random.default_rng(self._seed)
        self.num_workers = int(num_workers)
        self._start_workers(self.num_workers, "TripletIter")
        self.triplet_seq = []
        self.triplet_cur = 0
        self.seq = []
        self.cur = 0
        self.bag_stats = []
        self._epoch = -1  # mining rounds started (reset() calls) - 1
        self._bags_mined = 0
        self.is_init = False
        self._pool_rng_state = None
        self.triplet_reset()  # the pool only (no decoding, no embedding): the first bag is mined at the first next()

    # ------------------------------------------------------------------ pool and mining
    def triplet_reset(self):
        """Rebuild the pool: identities in random order, each with <= images_per_identity random images."""
        self._pool_rng_state = rng_state_to_json(self._rng)  # lets load_state_dict rebuild this pool
        ids = list(self.id2range)
        if self.shuffle:
            ids = [ids[i] for i in self._rng.permutation(len(ids))]
        seq = []
        for identity in ids:
            a, b = self.id2range[identity]
            images = np.arange(a, b)
            if self.shuffle:
                images = self._rng.permutation(images)
            seq.extend(images[:self.images_per_identity].tolist())
        self.triplet_seq = seq
        self.triplet_cur = 0

    def embed(self, record_ids):
        """Raw embeddings (N, D) of ``record_ids`` with the current weights of ``mx_model``.

        Images are decoded without augmentation and forwarded with ``is_train=False`` in chunks of
        ``batch_size`` (the shape the Module is bound for; a short last chunk is zero-padded); the
        embedding is ``outputs[0]``.
        """
        # BatchNorm's backward updates the moving statistics without declaring that write to MXNet's
        # engine, so a forward issued right after the last update could read them half-written: wait.
        mx.nd.waitall()
        chunks = []
        for start in range(0, len(record_ids), self.batch_size):
            ids = record_ids[start:start + self.batch_size]
            data = np.zeros((self.batch_size,) + self.data_shape, dtype=np.float32)
            data[:len(ids)] = self._decode_batch(ids, [(False, None)] * len(ids))
            chunks.append(self._forward(data)[:len(ids)])
        return np.concatenate(chunks)

    def _forward(self, data):
        if isinstance(self.mx_model, mx.mod.BaseModule):
            batch = mx.io.DataBatch(data=[mx.nd.array(data)], label=[mx.nd.zeros((data.shape[0],))])
            self.mx_model.forward(batch, is_train=False)
            return self.mx_model.get_outputs()[0].asnumpy()
        return np.asarray(self.mx_model(data))

    def labels_of(self, record_ids):
        """Identity labels (int64 array) of ``record_ids``; headers are read once and cached."""
        missing = [r for r in dict.fromkeys(record_ids) if r not in self._labels]
        if missing:
            self._labels.update(zip(missing, self.reader.labels(missing).tolist()))
        return np.array([self._labels[r] for r in record_ids], dtype=np.int64)

    def select_triplets(self):
        """Mine bags with the current weights until >= 2 global batches are queued; returns ``seq``."""
        seq = []
        triplets_per_chunk = self.per_batch_size // 3
        min_size = MIN_BATCHES_PER_ROUND * self.batch_size
        max_bags = MAX_POOL_PASSES * self.bags_per_pass
        bags = 0
        while len(seq) < min_size:
            if bags == max_bags:
                if len(seq) >= self.batch_size:
                    logger.warning("only %d triplet batch(es) found in %d bags (%d passes over the data): the model "
                                   "leaves few semi-hard triplets at alpha %.3f; continuing with them",
                                   len(seq) // self.batch_size, bags, MAX_POOL_PASSES, self.alpha)
                    break
                raise NoTripletsError(
                    f"TripletFaceImageIter: {bags} bags of {self.bag_size} images ({MAX_POOL_PASSES} passes over "
                    f"{self.path_imgrec}) gave {len(seq) // 3} triplets in full chunks, not one batch of "
                    f"{self.batch_size}: no semi-hard triplets at triplet_alpha={self.alpha}; raise triplet_alpha "
                    "or triplet_bag_size, or lower per_batch_size")
            if self.triplet_cur + self.bag_size > len(self.triplet_seq):
                self.triplet_reset()
            bag = self.triplet_seq[self.triplet_cur:self.triplet_cur + self.bag_size]
            self.triplet_cur += self.bag_size
            tic = time.perf_counter()
            embeddings = l2_normalize_rows(self.embed(bag))
            embed_seconds = time.perf_counter() - tic
            tic = time.perf_counter()
            sizes = run_lengths(self.labels_of(bag))
            triplets = pick_triplets(embeddings, sizes, self.alpha, self.max_ap, rng=self._rng)
            mine_seconds = time.perf_counter() - tic
            for start in range(0, len(triplets) - triplets_per_chunk + 1, triplets_per_chunk):
                chunk = triplets[start:start + triplets_per_chunk]
                for role in range(3):
                    seq.extend(bag[t[role]] for t in chunk)
            bags += 1
            stats = {"round": int(self._epoch), "bag": int(self._bags_mined), "images": len(bag),
                     "identities": len(sizes), "pairs": sum(n * (n - 1) // 2 for n in sizes),
                     "triplets": len(triplets), "embed_seconds": round(embed_seconds, 4),
                     "mine_seconds": round(mine_seconds, 4)}
            self._bags_mined += 1
            self.bag_stats.append(jsonable(stats))
            logger.info("found triplets %d (of %d pairs, %d identities); triplet time stat: embed %.3fs mine %.3fs; "
                        "seq len %d", stats["triplets"], stats["pairs"], stats["identities"], embed_seconds,
                        mine_seconds, len(seq))
        self.seq = seq
        return seq

    # ------------------------------------------------------------------ DataIter contract
    def reset(self):
        """Re-mine with the current weights and restart the epoch."""
        self._epoch += 1
        self._round_start = len(self.bag_stats)
        self.select_triplets()
        self.cur = 0
        self.is_init = True

    def next(self):
        """Next ``DataBatch``; ``StopIteration`` when fewer than ``batch_size`` queued images remain."""
        if not self.is_init:
            self.reset()
        if self.cur + self.batch_size > len(self.seq):
            raise StopIteration
        ids = self.seq[self.cur:self.cur + self.batch_size]
        self.cur += self.batch_size
        params = []
        for _ in ids:
            mirror = bool(self._rng.integers(0, 2)) if self.rand_mirror else False
            centre = augment.draw_cutoff(self._rng, self.image_size, prob=1.0) if self.cutoff > 0 else None
            params.append((mirror, centre))
        data = self._decode_batch(ids, params)
        label = self.labels_of(ids).astype(np.float32)
        return mx.io.DataBatch(data=[mx.nd.array(data)], label=[mx.nd.array(label)], pad=0,
                               provide_data=self.provide_data, provide_label=self.provide_label)

    @property
    def num_batches(self):
        """Batches in the current epoch (``len(seq) // batch_size``)."""
        return len(self.seq) // self.batch_size

    # ------------------------------------------------------------------ resume
    def state_dict(self):
        """Where the iterator stands, as a JSON-serialisable dict (plain ints, floats, bools, lists, str).

        Captures the epoch (mining rounds = ``reset()`` calls, - 1), the cursor (batches returned by
        ``next()`` in this epoch), the current round's layout ``seq`` (the mined triplets as record ids),
        the pool (as the generator state it was drawn from, plus its position ``triplet_cur`` and a
        checksum), the generator state that draws the next augmentation / pool / triplet choices, the
        stats of the current round's bags, and the construction fields that must match on load. Its size is
        O(len(seq)), independent of the cursor and of the dataset size.
        """
        return {
            "type": "TripletFaceImageIter",
            "version": STATE_VERSION,
            "config": self._state_config(),
            "seed": self._seed,
            "epoch": int(self._epoch),
            "is_init": bool(self.is_init),
            "cursor": int(self.cur // self.batch_size),
            "seq": [int(r) for r in self.seq],
            "rng_state": rng_state_to_json(self._rng),
            "pool_rng_state": jsonable(self._pool_rng_state),
            "pool_crc32": _crc32(self.triplet_seq),
            "triplet_cur": int(self.triplet_cur),
            "bags_mined": int(self._bags_mined),
            "round_bag_stats": jsonable(self.bag_stats[getattr(self, "_round_start", 0):] if self.is_init else []),
        }

    def load_state_dict(self, state):
        """Continue from ``state`` (from :meth:`state_dict` of an iterator built with the same arguments).

        Restores the round's triplet layout, the pool and the generator without decoding, embedding or
        mining anything: the following ``next()`` calls return, bitwise, the batches the saved iterator
        would have returned next; a later ``reset()`` mines the next bag(s) with the weights ``mx_model``
        has at that time, as the saved iterator would have. If the state was saved before the first
        ``next()``, the first ``next()`` mines (as on a fresh iterator). Do not call ``reset()`` after
        loading to "start" the epoch: it would mine a new round.

        An iterator built with ``seed=None`` accepts any saved seed; an explicit different seed, another
        ``.rec``, batch size, device count, bag size, alpha or augmentation setting raises ``ValueError``
        naming the field.
        """
        check_state_header("TripletFaceImageIter", state, STATE_VERSION)
        check_state_config("TripletFaceImageIter", state["config"], self._state_config())
        if self._seed is not None and state["seed"] is not None and int(state["seed"]) != self._seed:
            raise ValueError(f"TripletFaceImageIter.load_state_dict: seed mismatch: the state was saved with "
                             f"seed={state['seed']} but this iterator has seed={self._seed}; build it with the "
                             "seed of the saved run (or seed=None)")
        seq = [int(r) for r in state["seq"]]
        cursor, triplet_cur = int(state["cursor"]), int(state["triplet_cur"])
        if not 0 <= cursor <= len(seq) // self.batch_size or not 0 <= triplet_cur <= self.pool_size:
            raise ValueError(f"TripletFaceImageIter.load_state_dict: cursor {cursor} / triplet_cur {triplet_cur} out "
                             f"of range (seq of {len(seq)} images, pool of {self.pool_size})")
        # The pool: redraw it from the generator state it was drawn from (no decoding), check it.
        set_rng_state(self._rng, state["pool_rng_state"])
        self.triplet_reset()
        if _crc32(self.triplet_seq) != int(state["pool_crc32"]):
            raise ValueError("TripletFaceImageIter.load_state_dict: the triplet pool rebuilt from the state differs "
                             f"from the saved one (checksum); {self.path_imgrec} or the pool settings changed")
        self.triplet_cur = triplet_cur
        set_rng_state(self._rng, state["rng_state"])
        self.seq = seq
        self.cur = cursor * self.batch_size
        self._epoch = int(state["epoch"])
        self.is_init = bool(state["is_init"])
        self._bags_mined = int(state["bags_mined"])
        self.bag_stats = [dict(s) for s in state["round_bag_stats"]]
        self._round_start = 0

    def _state_config(self):
        return {"num_records": len(self.reader.keys), "num_images": self.reader.num_images,
                "identities": len(self.id2range), "pool_size": self.pool_size, "batch_size": self.batch_size,
                "ctx_num": self.ctx_num, "data_shape": list(self.data_shape), "shuffle": self.shuffle,
                "rand_mirror": self.rand_mirror, "cutoff": self.cutoff,
                "images_per_identity": self.images_per_identity, "bag_size": self.bag_size, "alpha": self.alpha,
                "max_ap": self.max_ap}

    # ------------------------------------------------------------------ decoding
    def _decode_batch(self, ids, params):
        """(len(ids), 3, H, W) float32 images; ``params[i] = (mirror, cutoff centre or None)``."""
        out = np.empty((len(ids),) + self.data_shape, dtype=np.float32)

        def work(positions):
            for i in positions:
                self._decode_one(ids[i], params[i], out[i])

        chunks = [range(s, min(s + _DECODE_CHUNK, len(ids))) for s in range(0, len(ids), _DECODE_CHUNK)]
        if self._executor is None:
            for positions in chunks:
                work(positions)
        else:
            for future in [self._executor.submit(work, positions) for positions in chunks]:
                future.result()
        return out

    def _decode_one(self, record_id, params, out):
        mirror, centre = params
        _, payload = self.reader.read(record_id)
        img = augment.decode_image(payload, self.image_size, f"{self.path_imgrec} record {record_id}")
        if mirror:
            img = augment.mirror(img)
        if centre is not None:
            img = augment.apply_cutoff(img.astype(np.float32), self.cutoff, centre, TRIPLET_CUTOFF_FILL)
        augment.to_chw_float(img, out)


def _crc32(record_ids):
    return int(zlib.crc32(np.asarray(record_ids, dtype=np.int64).tobytes()))


__all__ = ["TripletFaceImageIter", "NoTripletsError", "l2_normalize_rows", "run_lengths"]
