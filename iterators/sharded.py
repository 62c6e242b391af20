"""Rank shards of the training iterators for data parallelism across processes (Horovod ranks, ps-lite workers).

The rule, for ``num_parts`` ranks each reading ``batch_size`` (= B) rows of a global batch G = B x num_parts:
**rank r's batch k is exactly rows [r*B, (r+1)*B) of batch k of the one-process iterator built with batch size G
and the same seed.** So the shards are disjoint, deterministic, their union is the one-process batch, and every
epoch is reshuffled (one global permutation per epoch from (seed, epoch), computed by every rank). Random
augmentation decisions do not depend on the rank count: every rank draws the decisions of the whole global
batch in sequence order from the epoch's generator (cheap: a few numbers per image) and decodes only its slice.
Every rank yields ``floor(N / G)`` batches per epoch (the same count, so collectives stay in step).

insightface's ``recognition/partial_fc/mxnet/image_iter.py`` gives rank ``context`` a contiguous
``1/context_num`` of the shuffled list (``random.seed(epoch)``); the slicing per global batch here keeps the
one-process batches instead, which is what lets a 2-rank run equal a 2-device run.

Resume: the state is the one-process iterator's (``FaceImageIter.state_dict`` format, positions in the global
order). A state saved by rank 0 at a step boundary loads on every rank: each continues with its own slice of the
next global batch. A record that fails to decode is skipped and the rank takes the next image of its own slices
(the one-process iterator would take the next image of the global order there).
"""
import logging

import mxnet as mx
import numpy as np

from iterators.face_iter import _CHUNK, FaceImageIter
from iterators.triplet_iter import TripletFaceImageIter

logger = logging.getLogger(__name__)


def _check_part(part_index, num_parts):
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)) or num_parts < 1:
        raise ValueError(f"num_parts must be a positive integer, got {num_parts!r}")
    if isinstance(part_index, bool) or not isinstance(part_index, (int, np.integer)) or \
            not 0 <= part_index < num_parts:
        raise ValueError(f"part_index must be in 0..{num_parts - 1}, got {part_index!r}")
    return int(part_index), int(num_parts)


def shard_rows(part_index, num_parts, batch_size):
    """``slice`` of rank ``part_index``'s rows in a global batch of ``batch_size * num_parts``."""
    part_index, num_parts = _check_part(part_index, num_parts)
    return slice(part_index * batch_size, (part_index + 1) * batch_size)


class ShardedFaceImageIter(FaceImageIter):
    """:class:`iterators.FaceImageIter` reading rank ``part_index`` of ``num_parts`` (names as
    ``mx.io.ImageRecordIter``). ``batch_size`` is this rank's batch B (per_batch_size x its devices); the other
    arguments are FaceImageIter's. With ``num_parts == 1`` it yields exactly FaceImageIter's batches."""

    def __init__(self, batch_size, data_shape, path_imgrec, part_index=0, num_parts=1, **kwargs):
        self.part_index, self.num_parts = _check_part(part_index, num_parts)
        super().__init__(batch_size, data_shape, path_imgrec, **kwargs)
        if len(self.imgidx) < self.global_batch_size:
            raise ValueError(f"ShardedFaceImageIter: {self.path_imgrec} has {len(self.imgidx)} usable images, fewer "
                             f"than the global batch {self.global_batch_size} ({self.num_parts} ranks x {batch_size})")

    @property
    def global_batch_size(self):
        return self.batch_size * self.num_parts

    @property
    def num_batches(self):
        """Batches per epoch on every rank, ``floor(len(imgidx) / (batch_size * num_parts))``."""
        return len(self.imgidx) // self.global_batch_size

    def _state_config(self):
        config = super()._state_config()
        if self.num_parts > 1:  # a state saved with another rank count does not load (the batches differ)
            config["num_parts"] = self.num_parts
        return config

    def _fill(self):
        """As ``FaceImageIter._fill`` over this rank's slices only; the other ranks' positions are drawn (to keep
        the generator where the one-process iterator has it) and skipped without decoding."""
        G, B = self.global_batch_size, self.batch_size
        limit = (len(self.seq) // G) * G
        lo = self.part_index * B
        while len(self._pending) < self._window and self.cur < limit:
            base, offset = divmod(self.cur, G)
            base *= G
            if offset < lo or offset >= lo + B:
                skip_to = base + lo if offset < lo else base + G
                skip_to = min(skip_to, limit)
                for _ in range(skip_to - self.cur):
                    self._draw()
                self.cur = skip_to
                continue
            start = self.cur
            end = min(start + _CHUNK, base + lo + B)
            ids = self.seq[start:end].tolist()
            self.cur = end
            rng_state = self._rng.bit_generator.state
            params = [self._draw() for _ in ids]
            self._submit(start, ids, rng_state, params)


class ShardedTripletFaceImageIter(TripletFaceImageIter):
    """:class:`iterators.TripletFaceImageIter` for rank ``part_index`` of ``num_parts``.

    Built with the GLOBAL batch (``batch_size`` = per_batch_size x devices x ranks, ``ctx_num`` = devices x
    ranks), so every rank mines the same bags into the same global batches; ``next()`` draws the augmentation of
    the whole global batch and decodes only rows ``[r*B, (r+1)*B)``, whose device slices are each
    ``[anchors|positives|negatives]``. Bags are embedded in parts: each rank decodes and forwards its rows of
    every global chunk through ``mx_model`` (bound for B rows: a Module or ``f(B x 3 x H x W) -> B x D``) and
    ``allgather(numpy (B, D)) -> numpy (G, D)`` joins them in rank order, so mining sees the embeddings a
    one-process iterator computes. The iterator state is rank-independent (rank 0's state loads everywhere).
    """

    def __init__(self, batch_size, data_shape, path_imgrec, part_index=0, num_parts=1, allgather=None, **kwargs):
        self.part_index, self.num_parts = _check_part(part_index, num_parts)
        if batch_size % self.num_parts:
            raise ValueError(f"ShardedTripletFaceImageIter: global batch {batch_size} is not divisible by "
                             f"{self.num_parts} ranks")
        if self.num_parts > 1 and allgather is None:
            raise ValueError("ShardedTripletFaceImageIter: allgather is required with num_parts > 1")
        self.allgather = allgather
        super().__init__(batch_size, data_shape, path_imgrec, **kwargs)
        self.local_batch_size = self.batch_size // self.num_parts
        self.rows = shard_rows(self.part_index, self.num_parts, self.local_batch_size)
        self.provide_data = [mx.io.DataDesc(self.provide_data[0].name, (self.local_batch_size,) + self.data_shape)]
        self.provide_label = [mx.io.DataDesc(self.provide_label[0].name, (self.local_batch_size,))]

    def embed(self, record_ids):
        mx.nd.waitall()
        B, G = self.local_batch_size, self.batch_size
        chunks = []
        for start in range(0, len(record_ids), G):
            ids = record_ids[start:start + G]
            mine = ids[self.rows]
            data = np.zeros((B,) + self.data_shape, dtype=np.float32)
            if len(mine):
                data[:len(mine)] = self._decode_batch(mine, [(False, None)] * len(mine))
            emb = np.asarray(self._forward(data), dtype=np.float32)
            full = self.allgather(emb) if self.num_parts > 1 else emb
            chunks.append(np.asarray(full)[:len(ids)])
        return np.concatenate(chunks)

    def next(self):
        if not self.is_init:
            self.reset()
        if self.cur + self.batch_size > len(self.seq):
            raise StopIteration
        from iterators import augment
        ids = self.seq[self.cur:self.cur + self.batch_size]
        self.cur += self.batch_size
        params = []
        for _ in ids:  # the whole global batch's draws, as the one-process iterator
            mirror = bool(self._rng.integers(0, 2)) if self.rand_mirror else False
            centre = augment.draw_cutoff(self._rng, self.image_size, prob=1.0) if self.cutoff > 0 else None
            params.append((mirror, centre))
        ids, params = ids[self.rows], params[self.rows]
        data = self._decode_batch(ids, params)
        label = self.labels_of(ids).astype(np.float32)
        return mx.io.DataBatch(data=[mx.nd.array(data)], label=[mx.nd.array(label)], pad=0,
                               provide_data=self.provide_data, provide_label=self.provide_label)


__all__ = ["ShardedFaceImageIter", "ShardedTripletFaceImageIter", "shard_rows"]
