"""Face verification on insightface `.bin` packs: loading, embedding, 10-fold accuracy, TPR@FAR.

Same names, arguments and numbers as insightface's ``eval/verification.py`` (itself FaceNet's
``lfw.py``), spec §9:

* ``load_bin(path, image_size)`` decodes a pack (``mx.image.imdecode``, RGB) into two float32
  ``(2N, 3, H, W)`` NDArrays: the images and their horizontal flips.
* ``test(data_set, mx_model, batch_size)`` embeds both, sums the two raw embeddings of each image,
  L2-normalises the sums, and runs ``evaluate`` -> "Accuracy-Flip" (mean ± std over folds, ddof 0).
* ``evaluate`` / ``calculate_roc`` / ``calculate_val``: squared L2 distance between the two unit
  embeddings of a pair, contiguous K folds (the first ``n % k`` folds one pair longer), a pair is
  "same" when ``dist < threshold``; per fold the first threshold of ``np.arange(0, 4, 0.01)`` with the
  best training accuracy is applied to the test fold.

What differs from upstream, and why (the numbers do not, see the tests and
``benchmarks/bench_verification.py``):

* Speed: every threshold is evaluated at once. For sorted distances ``s`` of the positive (or
  negative) pairs of a split, ``#{dist < t} = searchsorted(s, t, side='left')``, so TP/FP/TN/FN for
  all thresholds cost one sort and one ``searchsorted`` instead of a pass over the data per threshold.
  Upstream compares a float32 ``dist`` with a float64 numpy *scalar* threshold; numpy 1.x then casts
  the threshold to float32 (value-based casting), so the thresholds are cast to ``dist.dtype`` before
  the search to keep every tie identical.
* VAL@FAR: upstream interpolates ``interp1d(far_train, thresholds, kind='slinear')``, which SciPy
  >= 1.9 refuses because ``far_train`` (a step function of the threshold) repeats values. We keep,
  for every distinct FAR value, its lowest threshold (the first one reaching it) and interpolate
  linearly with ``np.interp`` between those points; this is monotone and well defined. A fold
  without positive (negative) pairs gives VAL (FAR) 0 instead of ZeroDivisionError.
* ``test`` works for packs smaller than the batch (zero-padded batch, padded rows dropped).
* Packs are read with ``iterators.formats.bin_pack.read_bin`` (restricted unpickler: nothing in the file is
  executed) and structurally checked (odd image count, issame length, folds).
"""
import argparse
import json
import logging
import os
import re
import sys
import time
from typing import NamedTuple

import mxnet as mx
import numpy as np
from sklearn.preprocessing import normalize

from iterators.formats.atomic import atomic_write_text
from iterators.formats.bin_pack import PackFormatError, read_bin
from iterators.formats.images import parse_image_size
from iterators.formats.pairs import fold_slices

logger = logging.getLogger(__name__)

#: ROC threshold grid of ``evaluate`` (400 values 0.00 ... 3.99): squared distances of unit vectors.
ROC_THRESHOLDS = np.arange(0, 4, 0.01)
#: VAL@FAR threshold grid of ``evaluate`` (4000 values 0.000 ... 3.999).
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
#: The FAR at which ``evaluate`` reports VAL (= TPR), as insightface/FaceNet.
FAR_TARGET = 1e-3
#: Images decoded per chunk when filling the NDArrays (bounds the temporary uint8/float32 copies).
_LOAD_CHUNK = 1000


class ModelLoadError(ValueError):
    """A checkpoint that cannot be used for verification (message names the file and the fix)."""


# ----------------------------------------------------------------------------------- loading


def _check_folds(path, num_pairs, nfolds):
    if nfolds is None:
        return
    if num_pairs < nfolds:
        raise PackFormatError(
            f"{path}: {num_pairs} pairs cannot be split into {nfolds} folds; build the pack with at "
            f"least {nfolds} pairs (python -m iterators.tools.build_bin --num-pairs ...) or lower nfolds")
    if num_pairs % nfolds:
        raise PackFormatError(
            f"{path}: {num_pairs} pairs is not divisible into {nfolds} equal folds, so fold boundaries "
            f"would not match the pack's fold layout; rebuild with a multiple of {2 * nfolds} pairs "
            "(iterators.tools.build_bin / iterators.formats.pairs.sample_pairs) or pass nfolds=None to skip this check")


def load_bin(path, image_size, nfolds=10):
    """Load a verification pack as insightface does.

    Parameters
    ----------
    path : str
        ``<name>.bin``: pickled ``(bins, issame_list)`` (Python 2 or 3, bytes or cv2 arrays).
    image_size : (int, int)
        ``(H, W)``. As upstream, an image whose *width* differs from ``image_size[0]`` is resized
        with ``mx.image.resize_short(img, image_size[0])``; the result must then be ``H x W``.
    nfolds : int or None
        Refuse packs whose pair count is below ``nfolds`` or not divisible by it (a pack's balanced
        folds must line up with the contiguous evaluation folds). ``None`` skips the check.

    Returns
    -------
    data_list : [mx.nd.NDArray, mx.nd.NDArray]
        float32 ``(2N, 3, H, W)`` RGB 0..255: the images, and their horizontal flips.
    issame_list : list of bool, length N

    Raises
    ------
    FileNotFoundError, iterators.formats.bin_pack.PackFormatError
        Missing file; unsafe/unreadable pickle; odd image count; issame length mismatch; fold
        problem (see ``nfolds``); an image that cannot be decoded or has the wrong size.
    """
    path = os.fspath(path)
    height, width = (int(v) for v in image_size)
    bins, issame_list = read_bin(path)
    _check_folds(path, len(issame_list), nfolds)
    count = len(bins)
    data_list = [mx.nd.empty((count, 3, height, width)) for _ in range(2)]
    for start in range(0, count, _LOAD_CHUNK):
        stop = min(start + _LOAD_CHUNK, count)
        chunk = np.empty((stop - start, height, width, 3), dtype=np.uint8)
        for i in range(start, stop):
            try:
                img = mx.image.imdecode(bins[i])
            except mx.base.MXNetError as exc:
                raise PackFormatError(f"{path}: image {i} (pair {i // 2}) cannot be decoded: "
                                      f"{str(exc).strip().splitlines()[-1]}") from None
            if img.shape[1] != height:  # upstream compares the width with image_size[0]
                img = mx.image.resize_short(img, height)
            if img.shape[:2] != (height, width):
                raise PackFormatError(
                    f"{path}: image {i} (pair {i // 2}) is {img.shape[0]}x{img.shape[1]} after resize_short "
                    f"to {height}; expected {height}x{width}. Pack images must be aligned crops with "
                    "the aspect ratio of image_size (rebuild with python -m iterators.tools.build_bin --image-size)")
            chunk[i - start] = img.asnumpy()
        data_list[0][start:stop] = chunk.transpose(0, 3, 1, 2)
        data_list[1][start:stop] = chunk[:, :, ::-1, :].transpose(0, 3, 1, 2)
        logger.debug("loading bin %d", stop)
    logger.info("%s: %s", path, data_list[0].shape)
    return data_list, issame_list


# ------------------------------------------------------------------------------- evaluation


def calculate_accuracy(threshold, dist, actual_issame):
    """TPR, FPR and accuracy of the rule ``dist < threshold``.

    Returns
    -------
    tpr, fpr, acc : float
        ``tp / (tp + fn)`` (0 without positives), ``fp / (fp + tn)`` (0 without negatives),
        ``(tp + tn) / dist.size``.
    """
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def calculate_val_far(threshold, dist, actual_issame):
    """VAL (true accept rate) and FAR (false accept rate) of ``dist < threshold``.

    ``val = TA / n_same``, ``far = FA / n_diff``; 0 when the split has no positive (negative) pairs,
    where upstream raised ZeroDivisionError.
    """
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    val = float(true_accept) / float(n_same) if n_same else 0.0
    far = float(false_accept) / float(n_diff) if n_diff else 0.0
    return val, far


def _compare_dtype(dist):
    # numpy 1.x compares an array with a Python/numpy *scalar* in the array's float dtype
    # (value-based casting): `float32_dist < np.float64(0.01)` compares against float32(0.01).
    return dist.dtype if np.issubdtype(dist.dtype, np.floating) else np.float64


def _count_below(sorted_values, thresholds):
    """``#{v < t}`` for every t (NaNs, sorted last, are never below a threshold, as ``nan < t``)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _rates(dist, issame, thresholds):
    """TP, FP counts for all thresholds at once, plus the positive/negative totals.

    Parameters
    ----------
    dist : (n,) float array; issame : (n,) bool array; thresholds : (T,) array in ``dist.dtype``.

    Returns
    -------
    tp, fp : (T,) int arrays (``#{dist < t}`` among positive / negative pairs); n_pos, n_neg : int
    """
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    return _count_below(pos, thresholds), _count_below(neg, thresholds), pos.size, neg.size


def _accuracy_curve(tp, fp, n_pos, n_neg):
    """Per-threshold ``tpr, fpr, acc`` arrays, with calculate_accuracy's formulas."""
    tn = n_neg - fp
    fn = n_pos - tp
    tpr = tp / n_pos if n_pos else np.zeros(tp.shape)
    fpr = fp / n_neg if n_neg else np.zeros(fp.shape)
    acc = (tp + tn) / (n_pos + n_neg)
    return tpr, fpr, acc


def _folds(nrof_pairs, nrof_folds):
    """(train_index, test_index) pairs of insightface's ``LFold`` (KFold without shuffling)."""
    if nrof_folds < 1 or int(nrof_folds) != nrof_folds:
        raise ValueError(f"nrof_folds must be a positive integer, got {nrof_folds!r}")
    indices = np.arange(nrof_pairs)
    if nrof_folds == 1:  # LFold: one "fold" trains and tests on everything
        return [(indices, indices)]
    if nrof_pairs < nrof_folds:
        raise ValueError(f"{nrof_pairs} pairs cannot be split into {nrof_folds} folds; "
                         "use more pairs or fewer folds")
    out = []
    for sl in fold_slices(nrof_pairs, nrof_folds):
        test_idx = indices[sl]
        train_idx = np.concatenate([indices[:sl.start], indices[sl.stop:]])
        out.append((train_idx, test_idx))
    return out


def _pair_inputs(embeddings1, embeddings2, actual_issame):
    embeddings1 = np.asarray(embeddings1)
    embeddings2 = np.asarray(embeddings2)
    if embeddings1.ndim != 2 or embeddings1.shape != embeddings2.shape:
        raise ValueError(f"embeddings1 {embeddings1.shape} and embeddings2 {embeddings2.shape} must be "
                         "two (N, D) arrays of the same shape")
    actual_issame = np.asarray(actual_issame, dtype=bool).ravel()
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    if len(actual_issame) != embeddings1.shape[0]:
        logger.warning("%d issame labels for %d embedding pairs: using the first %d (as insightface)",
                       len(actual_issame), embeddings1.shape[0], nrof_pairs)
    return embeddings1, embeddings2, actual_issame, nrof_pairs


def _squared_distance(embeddings1, embeddings2):
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)
    if not np.isfinite(dist).all():
        logger.warning("%d pair distances are NaN/Inf (diverged model?): those pairs never count as 'same'",
                       int((~np.isfinite(dist)).sum()))
    return dist


def calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10, pca=0):
    """K-fold ROC and accuracy (insightface/FaceNet ``calculate_roc``), all thresholds at once.

    Parameters
    ----------
    thresholds : (T,) array
        Candidate thresholds on the squared distance ``dist = sum((e1 - e2)**2, axis=1)``.
    embeddings1, embeddings2 : (N, D) arrays
        First and second embedding of each pair (unit vectors in practice, so dist in [0, 4]).
    actual_issame : (N,) bool
    nrof_folds : int
        Contiguous folds; the first ``N % k`` folds are one pair longer; 1 = train and test on all.
    pca : int
        > 0: per fold, fit ``sklearn.decomposition.PCA(pca)`` on the training embeddings, project
        and L2-normalise all embeddings, recompute ``dist`` (as upstream; unused by ``test``).

    Returns
    -------
    tpr, fpr : (T,) arrays
        Mean over folds of the test-fold TPR/FPR at each threshold.
    accuracy : (nrof_folds,) array
        Test-fold accuracy at the first threshold maximising the training-fold accuracy.
    """
    embeddings1, embeddings2, actual_issame, nrof_pairs = _pair_inputs(embeddings1, embeddings2, actual_issame)
    if pca > 0:
        def dist_for(train_set):
            return _pca_distance(embeddings1, embeddings2, train_set, pca)
    else:
        dist = _squared_distance(embeddings1, embeddings2)

        def dist_for(train_set):
            return dist
    return _roc(np.asarray(thresholds), dist_for, actual_issame, _folds(nrof_pairs, nrof_folds))


def roc_from_distances(thresholds, dist, actual_issame, nrof_folds=10):
    """``calculate_roc`` on precomputed pair distances ``dist`` (N,); same returns."""
    dist = np.asarray(dist)
    actual_issame = np.asarray(actual_issame, dtype=bool)
    nrof_pairs = min(len(actual_issame), len(dist))
    return _roc(np.asarray(thresholds), lambda train_set: dist, actual_issame, _folds(nrof_pairs, nrof_folds))


def _roc(thresholds, dist_for, actual_issame, folds):
    tprs = np.zeros((len(folds), len(thresholds)))
    fprs = np.zeros((len(folds), len(thresholds)))
    accuracy = np.zeros(len(folds))
    for fold_idx, (train_set, test_set) in enumerate(folds):
        dist = dist_for(train_set)
        thr = thresholds.astype(_compare_dtype(dist))
        train_acc = _accuracy_curve(*_rates(dist[train_set], actual_issame[train_set], thr))[2]
        best_threshold_index = int(np.argmax(train_acc))  # first maximum = lowest threshold
        tprs[fold_idx], fprs[fold_idx], test_acc = _accuracy_curve(
            *_rates(dist[test_set], actual_issame[test_set], thr))
        accuracy[fold_idx] = test_acc[best_threshold_index]
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy


def _pca_distance(embeddings1, embeddings2, train_set, pca):
    from sklearn.decomposition import PCA
    train = np.concatenate((embeddings1[train_set], embeddings2[train_set]))
    model = PCA(n_components=pca).fit(train)
    e1 = normalize(model.transform(embeddings1))
    e2 = normalize(model.transform(embeddings2))
    return _squared_distance(e1, e2)


def _threshold_at_far(far_train, thresholds, far_target):
    """Threshold whose training FAR is ``far_target`` (replacement for ``interp1d(..., 'slinear')``).

    ``far_train[t]`` is a non-decreasing step function of the threshold and repeats values, which
    SciPy >= 1.9's ``interp1d`` refuses. Keep, for each distinct FAR, the first (lowest) threshold
    reaching it, and interpolate linearly between those points (``np.interp``, clamped at the ends).
    """
    far_values, first_index = np.unique(far_train, return_index=True)
    return float(np.interp(far_target, far_values, thresholds[first_index]))


def calculate_val(thresholds, embeddings1, embeddings2, actual_issame, far_target, nrof_folds=10):
    """K-fold VAL (true accept rate) at a target FAR (insightface/FaceNet ``calculate_val``).

    Per fold: FAR on the training pairs for every threshold; if it reaches ``far_target``, the
    threshold is interpolated at ``far_target`` (see ``_threshold_at_far``), else 0; VAL and FAR are
    then measured on the test fold with ``dist < threshold``.

    Returns
    -------
    val_mean, val_std, far_mean : float
        Mean and std (ddof 0) of the test-fold VAL, mean test-fold FAR.
    """
    embeddings1, embeddings2, actual_issame, _ = _pair_inputs(embeddings1, embeddings2, actual_issame)
    return val_from_distances(thresholds, _squared_distance(embeddings1, embeddings2), actual_issame,
                              far_target, nrof_folds)


def val_from_distances(thresholds, dist, actual_issame, far_target, nrof_folds=10):
    """``calculate_val`` on precomputed pair distances ``dist`` (N,); same returns."""
    dist = np.asarray(dist)
    actual_issame = np.asarray(actual_issame, dtype=bool)
    thresholds = np.asarray(thresholds)
    folds = _folds(min(len(actual_issame), len(dist)), nrof_folds)
    thr = thresholds.astype(_compare_dtype(dist))
    val = np.zeros(len(folds))
    far = np.zeros(len(folds))
    for fold_idx, (train_set, test_set) in enumerate(folds):
        train_issame = actual_issame[train_set]
        negatives = np.sort(dist[train_set][~train_issame])
        if negatives.size == 0:
            logger.warning("calculate_val: fold %d has no negative training pairs (FAR taken as 0)", fold_idx)
            far_train = np.zeros(len(thr))
        else:
            far_train = _count_below(negatives, thr) / negatives.size
        if np.max(far_train) >= far_target:
            threshold = _threshold_at_far(far_train, thresholds, far_target)
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = calculate_val_far(threshold, dist[test_set], actual_issame[test_set])
    return np.mean(val), np.std(val), np.mean(far)


def evaluate(embeddings, actual_issame, nrof_folds=10, pca=0):
    """insightface's ``evaluate``: rows ``2i`` and ``2i+1`` of ``embeddings`` form pair i.

    Parameters
    ----------
    embeddings : (2N, D) array
        Normalised embeddings (``test`` passes the L2-normalised flip sums).
    actual_issame : (N,) bool

    Returns
    -------
    tpr, fpr : (400,) arrays (mean ROC over folds on ``ROC_THRESHOLDS``)
    accuracy : (nrof_folds,) array
    val, val_std, far : float (VAL@FAR=1e-3 on ``VAL_THRESHOLDS``)
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"embeddings must be (2N, D) with rows 2i, 2i+1 = pair i; got shape {embeddings.shape}")
    embeddings1 = embeddings[0::2]
    embeddings2 = embeddings[1::2]
    tpr, fpr, accuracy = calculate_roc(ROC_THRESHOLDS, embeddings1, embeddings2, np.asarray(actual_issame),
                                       nrof_folds=nrof_folds, pca=pca)
    val, val_std, far = calculate_val(VAL_THRESHOLDS, embeddings1, embeddings2, np.asarray(actual_issame),
                                      FAR_TARGET, nrof_folds=nrof_folds)
    return tpr, fpr, accuracy, val, val_std, far


def tpr_at_far(embeddings, actual_issame, far_target=FAR_TARGET, nrof_folds=10):
    """TPR (= VAL) at ``far_target`` for printing, e.g. ``TPR@FAR=1e-3: 0.98xxx+-0.00xxx``.

    Same folds, thresholds (``VAL_THRESHOLDS``) and interpolation as ``evaluate``'s VAL.

    Returns
    -------
    tpr_mean, tpr_std, far_mean : float
    """
    embeddings = np.asarray(embeddings)
    return calculate_val(VAL_THRESHOLDS, embeddings[0::2], embeddings[1::2], np.asarray(actual_issame),
                         far_target, nrof_folds=nrof_folds)


# ------------------------------------------------------------------------------ model test


class _TestTuple(NamedTuple):
    acc1: float
    std1: float
    acc2: float
    std2: float
    xnorm: float
    embeddings_list: list


class VerificationResult(_TestTuple):
    """Unpacks like insightface's ``test``: ``acc1, std1, acc2, std2, xnorm, embeddings_list``.

    ``acc1 = std1 = 0.0`` as upstream (the non-flip accuracy is not computed); ``acc2 ± std2`` is
    the "Accuracy-Flip". Extra attributes (not part of the tuple): ``accuracy`` (per-fold array),
    ``tpr``/``fpr`` (mean ROC over ``ROC_THRESHOLDS``), ``val``/``val_std``/``far`` (TPR@FAR=1e-3)
    and ``infer_time`` (seconds of forward passes, 0 when no model ran).
    """

    @classmethod
    def build(cls, acc1, std1, acc2, std2, xnorm, embeddings_list, **extra):
        result = cls(acc1, std1, acc2, std2, xnorm, embeddings_list)
        result.__dict__.update(extra)
        return result


def _normalize_rows(embeddings):
    """sklearn's ``normalize`` (upstream's), except that rows with NaN/Inf become NaN instead of raising.

    A diverged model must not crash training-time verification; its NaN pairs never count as
    "same" (``nan < t`` is False), which shows up as a low accuracy.
    """
    finite = np.isfinite(embeddings).all(axis=1)
    if finite.all():
        return normalize(embeddings)
    logger.warning("%d of %d embeddings contain NaN/Inf (diverged model?)", int((~finite).sum()), len(finite))
    out = np.full(embeddings.shape, np.nan, dtype=np.result_type(embeddings.dtype, np.float32))
    if finite.any():
        out[finite] = normalize(embeddings[finite])
    return out


def evaluate_embeddings(embeddings_list, issame_list, nfolds=10, infer_time=0.0):
    """The flip protocol of ``test`` on precomputed raw embeddings.

    Parameters
    ----------
    embeddings_list : [(2N, D) array, (2N, D) array]
        Raw embeddings of the images and of their horizontal flips.
    issame_list : (N,) bool

    Returns
    -------
    VerificationResult
        ``xnorm = mean ||e||_2`` over all 4N raw rows; accuracy from
        ``evaluate(normalize(e_orig + e_flip), issame_list)``.
    """
    norms = np.concatenate([np.linalg.norm(e, axis=1) for e in embeddings_list]).astype(np.float64)
    xnorm = float(np.mean(norms))
    embeddings = _normalize_rows(embeddings_list[0] + embeddings_list[1])
    logger.info("%s", embeddings.shape)
    tpr, fpr, accuracy, val, val_std, far = evaluate(embeddings, issame_list, nrof_folds=nfolds)
    acc2, std2 = float(np.mean(accuracy)), float(np.std(accuracy))
    return VerificationResult.build(0.0, 0.0, acc2, std2, xnorm, list(embeddings_list), accuracy=accuracy,
                                    tpr=tpr, fpr=fpr, val=float(val), val_std=float(val_std), far=float(far),
                                    infer_time=infer_time)


def _embed(data, mx_model, batch_size, label, data_extra):
    """Forward ``data`` (n, 3, H, W) in windows of exactly ``batch_size`` rows; return (n, D) and seconds.

    n >= batch_size: upstream's windows ``data[bb - batch_size: bb]`` (the last one overlaps the
    previous, keeping only its new rows). n < batch_size: one zero-padded batch, padded rows dropped
    (rows are independent at inference, BatchNorm uses its moving statistics).
    """
    n = data.shape[0]
    embeddings = None
    seconds = 0.0
    if n < batch_size:
        padded = mx.nd.zeros((batch_size,) + tuple(data.shape[1:]), dtype=data.dtype)
        padded[:n] = data
        windows = [(padded, 0, n, n)]
    else:
        windows = []
        ba = 0
        while ba < n:
            bb = min(ba + batch_size, n)
            count = bb - ba
            windows.append((mx.nd.slice_axis(data, axis=0, begin=bb - batch_size, end=bb), ba, bb, count))
            ba = bb
    for window, ba, bb, count in windows:
        inputs = (window,) if data_extra is None else (window, mx.nd.array(data_extra))
        batch = mx.io.DataBatch(data=inputs, label=(label,))
        tic = time.perf_counter()
        mx_model.forward(batch, is_train=False)
        out = mx_model.get_outputs()[0].asnumpy()
        seconds += time.perf_counter() - tic
        if embeddings is None:
            embeddings = np.zeros((n, out.shape[1]), dtype=out.dtype)
        if n < batch_size:
            embeddings[:] = out[:n]
        else:
            embeddings[ba:bb, :] = out[batch_size - count:, :]
    return embeddings, seconds


def test(data_set, mx_model, batch_size, nfolds=10, data_extra=None, label_shape=None):
    """Verification accuracy of a bound model on a loaded pack (insightface's ``test``).

    Parameters
    ----------
    data_set : (data_list, issame_list)
        As returned by ``load_bin``.
    mx_model : mx.mod.Module
        Bound for inference or training with data ``(batch_size, 3, H, W)``; ``outputs[0]`` is the
        embedding. A label input (training Module) is fed ones, ``nd.ones(label_shape)`` if given.
    batch_size : int
        Rows per forward; packs smaller than a batch are zero-padded.
    nfolds : int
    data_extra : array or None
        Second data input fed with every batch (upstream's ``data_extra``).

    Returns
    -------
    VerificationResult
        Unpacks as ``(acc1, std1, acc2, std2, xnorm, embeddings_list)``; see ``evaluate_embeddings``.
    """
    logger.info("testing verification..")
    data_list, issame_list = data_set
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    label = mx.nd.ones(label_shape if label_shape is not None else (batch_size,))
    embeddings_list = []
    infer_time = 0.0
    for data in data_list:
        embeddings, seconds = _embed(data, mx_model, batch_size, label, data_extra)
        embeddings_list.append(embeddings)
        infer_time += seconds
    logger.info("infer time %f", infer_time)
    return evaluate_embeddings(embeddings_list, issame_list, nfolds=nfolds, infer_time=infer_time)


def pixel_baseline(data_set, nfolds=10):
    """Raw-pixel verification baseline, to print next to a model's accuracy.

    The "network" is: flatten the image and subtract the pack's mean image. Everything else is
    ``test``'s protocol (flip sum, L2 normalisation, 10-fold accuracy). A model that does not beat
    this has not learned faces. Holds the whole pack as a ``(2N, 3*H*W)`` float32 array, so it is
    meant for small packs (demo, tests).

    Returns
    -------
    VerificationResult (``infer_time`` 0)
    """
    data_list, issame_list = data_set
    flat = [d.asnumpy().reshape(d.shape[0], -1) for d in data_list]
    mean = flat[0].mean(axis=0, dtype=np.float64).astype(np.float32)  # flipping permutes pixels only
    flip_mean = flat[1].mean(axis=0, dtype=np.float64).astype(np.float32)
    return evaluate_embeddings([flat[0] - mean, flat[1] - flip_mean], issame_list, nfolds=nfolds)


def format_lines(name, result, batch=None, with_tpr=True):
    """insightface's console lines for one target, e.g. ``[lfw]Accuracy-Flip: 0.99817+-0.00229``.

    ``batch`` (training) gives ``[lfw][2000]XNorm: ...``. With ``with_tpr`` a
    ``[lfw]TPR@FAR=1e-3: ...`` line follows (needs a result from ``test``/``evaluate_embeddings``).
    """
    tag = f"[{name}]" if batch is None else f"[{name}][{batch}]"
    lines = [f"{tag}XNorm: {result.xnorm:f}"]
    if batch is None:
        lines.append(f"{tag}Accuracy: {result.acc1:1.5f}+-{result.std1:1.5f}")
    lines.append(f"{tag}Accuracy-Flip: {result.acc2:1.5f}+-{result.std2:1.5f}")
    if with_tpr:
        lines.append(f"{tag}TPR@FAR=1e-3: {result.val:1.5f}+-{result.val_std:1.5f}")
    return lines


# ------------------------------------------------------------------------------------- CLI


def parse_model_arg(spec):
    """Split ``--model``: ``prefix,epoch[,epoch2|epoch3...]`` -> ``(prefix, [epochs])``.

    Without a comma the epochs are those of the ``<prefix>-NNNN.params`` files found (``None`` here).
    """
    if "," not in spec:
        return spec, None
    prefix, rest = spec.split(",", 1)
    epochs = []
    for token in re.split(r"[,|]", rest):
        token = token.strip()
        if not token:
            continue
        if not token.isdigit():
            raise ValueError(f"--model {spec!r}: epoch {token!r} is not a non-negative integer "
                             "(expected prefix,epoch[,epoch2...] or prefix,epoch|epoch2)")
        epochs.append(int(token))
    if not epochs:
        raise ValueError(f"--model {spec!r}: no epoch after the comma")
    return prefix, epochs


def find_epochs(prefix):
    """Epochs of all ``<prefix>-NNNN.params`` files, newest first (prefixes may contain '-')."""
    directory = os.path.dirname(prefix) or "."
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"-(\d+)\.params$")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--model {prefix}: directory {directory} does not exist")
    epochs = sorted((int(m.group(1)) for m in map(pattern.match, os.listdir(directory)) if m), reverse=True)
    if not epochs:
        raise FileNotFoundError(f"--model {prefix}: no {os.path.basename(prefix)}-NNNN.params in {directory}; "
                                "give the epoch explicitly as prefix,epoch")
    return epochs


def load_embedding_module(prefix, epoch, ctx, batch_size, image_size):
    """Module computing ``fc1_output`` of a checkpoint (embedding-only or full training symbol).

    Extra parameters (``fc7_weight``...) are ignored; a missing one raises ``ModelLoadError``.
    """
    for path in (f"{prefix}-symbol.json", "%s-%04d.params" % (prefix, epoch)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path} (--model prefix,epoch)")
    sym, arg_params, aux_params = mx.model.load_checkpoint(prefix, epoch)
    internals = sym.get_internals()
    if "fc1_output" not in internals.list_outputs():
        raise ModelLoadError(f"{prefix}-symbol.json has no 'fc1_output' node (outputs: {sym.list_outputs()}); "
                             "verification needs insightface's embedding layer named fc1")
    sym = internals["fc1_output"]
    model = mx.mod.Module(symbol=sym, context=ctx, label_names=None)
    model.bind(data_shapes=[("data", (batch_size, 3) + tuple(image_size))], for_training=False)
    missing = [n for n in sym.list_arguments() if n != "data" and n not in arg_params]
    missing += [n for n in sym.list_auxiliary_states() if n not in aux_params]
    if missing:
        raise ModelLoadError("%s-%04d.params lacks %s needed by fc1_output" % (prefix, epoch, ", ".join(missing)))
    model.set_params(arg_params, aux_params, allow_extra=True)
    return model


def _read_image_size(data_dir, flag):
    if flag:
        return parse_image_size(flag)
    prop = os.path.join(data_dir, "property")
    if os.path.isfile(prop):
        from iterators.formats.recordio import read_property
        _, size = read_property(data_dir)
        return tuple(size)
    return 112, 112


def _select_context(args):
    if args.cpu:
        return mx.cpu()
    gpus = mx.context.num_gpus()
    if args.gpu is None:
        return mx.gpu(0) if gpus else mx.cpu()
    if args.gpu < 0:
        return mx.cpu()
    if args.gpu >= gpus:
        raise ModelLoadError(f"--gpu {args.gpu}: MXNet sees {gpus} GPU(s) (CPU build or no CUDA device); "
                             "run with --cpu")
    return mx.gpu(args.gpu)


def _write_json(path, payload):
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def plot_roc(curves, path):
    """Save ROC curves ``[(label, fpr, tpr)]`` (mean test-fold rates per threshold) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, fpr, tpr in curves:
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title("verification ROC (10-fold mean)")
    ax.legend(loc="lower right", fontsize=8)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m eval.verification",
        description="10-fold face verification of MXNet checkpoints on insightface .bin packs.")
    parser.add_argument("--data-dir", default="", help="directory containing <target>.bin (and optionally property)")
    parser.add_argument("--model", required=True,
                        help="prefix,epoch[,epoch2...] (or prefix,epoch|epoch2); prefix alone = all epochs found")
    parser.add_argument("--target", default="lfw,cfp_ff,cfp_fp,agedb_30", help="comma list; missing packs are skipped")
    parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: GPU 0 if present, else CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max", default="", help="'a,b': when more than b epochs are found keep epochs[a:b]")
    parser.add_argument("--nfolds", type=int, default=10)
    parser.add_argument("--image-size", default="", help="H,W (default: from <data-dir>/property, else 112,112)")
    parser.add_argument("--roc-plot", default="", help="write the ROC curves of all targets/epochs to this PNG")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cpu and args.gpu is not None:
        parser.error("--gpu and --cpu are mutually exclusive")
    if args.batch_size < 1 or args.nfolds < 1:
        parser.error("--batch-size and --nfolds must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except (FileNotFoundError, PackFormatError, ModelLoadError, ValueError) as exc:
        print(f"eval.verification: error: {exc}", file=sys.stderr)
        return 1


def _run(args):
    ctx = _select_context(args)
    image_size = _read_image_size(args.data_dir, args.image_size)
    prefix, epochs = parse_model_arg(args.model)
    if epochs is None:
        epochs = find_epochs(prefix)
        if args.max:
            bounds = [int(x) for x in args.max.split(",")]
            if len(bounds) != 2:
                raise ValueError(f"--max {args.max!r}: expected a,b")
            if len(epochs) > bounds[1]:
                epochs = epochs[bounds[0]:bounds[1]]
    print("image_size", image_size, "context", ctx)
    nets = []
    tic = time.time()
    for epoch in epochs:
        print("loading", prefix, epoch)
        nets.append((epoch, load_embedding_module(prefix, epoch, ctx, args.batch_size, image_size)))
    print("model number", len(nets))
    print("model loading time", time.time() - tic)

    ver_list, ver_names = [], []
    for name in [t for t in args.target.split(",") if t]:
        path = os.path.join(args.data_dir, name + ".bin")
        if os.path.exists(path):
            print("loading..", name)
            ver_list.append(load_bin(path, image_size, nfolds=args.nfolds))
            ver_names.append(name)
    if not ver_list:
        raise FileNotFoundError(f"none of the targets {args.target} has a .bin in {args.data_dir or '.'}")

    records, curves = [], []
    for name, data_set in zip(ver_names, ver_list):
        accs = []
        for epoch, model in nets:
            result = test(data_set, model, args.batch_size, args.nfolds)
            for line in format_lines(name, result):
                print(line)
            accs.append(result.acc2)
            curves.append((f"{name} epoch {epoch} ({result.acc2:.4f})", result.fpr, result.tpr))
            records.append({"target": name, "epoch": epoch, "xnorm": result.xnorm,
                            "accuracy_flip": result.acc2, "accuracy_flip_std": result.std2,
                            "fold_accuracy": [float(a) for a in result.accuracy],
                            "tpr_at_far_1e-3": result.val, "tpr_at_far_1e-3_std": result.val_std,
                            "far": result.far, "num_pairs": len(data_set[1]), "infer_time": result.infer_time})
        print("Max of [%s] is %1.5f" % (name, np.max(accs)))
    if args.roc_plot:
        plot_roc(curves, args.roc_plot)
        print("roc plot", args.roc_plot)
    if args.json:
        _write_json(args.json, {"model": prefix, "epochs": epochs, "image_size": list(image_size),
                                "nfolds": args.nfolds, "results": records})
        print("json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
