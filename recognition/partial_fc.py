"""Partial FC class sampling (insightface ``recognition/partial_fc/mxnet/memory_samplers.py`` and
``memory_bank.py``): which rows of a class shard are trained in one step.

Per step and shard: the positive classes (the shard's classes present in the global batch) are always kept,
the rest is filled with negatives drawn uniformly without replacement from the shard's other classes up to
``num_sample = max(1, int(sample_rate * rows))``; the indices are sorted. Unlike upstream, which truncates the
positives to ``num_sample`` (a sample's target class could then be missing from the softmax), a batch with
more positives than ``num_sample`` trains all its positives and no negatives.

Only the sampled rows and their momentum are read and written (:class:`recognition.model_parallel.ClassShard`);
with ``sample_rate = 1`` the engine uses the plain model-parallel path, which the sampled path equals.
"""
import numpy as np


class ClassSampler:
    """Rows of one shard to train per step.

    Parameters
    ----------
    num_classes : int, rows of the shard
    sample_rate : float in (0, 1]
    rng : np.random.RandomState or None (a fresh unseeded one)
    """

    def __init__(self, num_classes, sample_rate, rng=None):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")
        self.num_classes = int(num_classes)
        self.num_sample = max(1, int(self.num_classes * sample_rate))
        self.rng = rng if rng is not None else np.random.RandomState()

    def size(self, num_positive):
        """Rows trained in a step with ``num_positive`` positive classes on this shard."""
        return max(self.num_sample, int(num_positive))

    def sample(self, positives):
        """Sorted int64 row indices: every row of ``positives`` (unique local indices) plus uniform negatives."""
        positives = np.unique(np.asarray(positives, dtype=np.int64))
        need = self.size(len(positives)) - len(positives)
        if need > 0:
            mask = np.ones(self.num_classes, dtype=bool)
            mask[positives] = False
            pool = np.flatnonzero(mask)
            negatives = self.rng.choice(pool, need, replace=False)
            positives = np.concatenate([positives, negatives.astype(np.int64)])
        positives.sort()
        return positives
