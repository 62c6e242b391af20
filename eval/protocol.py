"""The verification protocol on embeddings: K folds, threshold selection, accuracy, ROC, VAL@FAR.

Pure numpy (plus scikit-learn's ``normalize``/``PCA`` as upstream): nothing here runs a model. Same names,
arguments and numbers as insightface's ``recognition/arcface_mxnet/verification.py`` (itself FaceNet's
``lfw.py``): ``calculate_roc``, ``calculate_accuracy``, ``calculate_val``, ``calculate_val_far``,
``evaluate`` and the folds of its ``LFold`` class; the flip protocol of its ``test`` on precomputed
embeddings is ``evaluate_embeddings``. See docs/verification.md.

* Pair i is rows ``2i, 2i+1`` of the embeddings; ``dist`` is their squared L2 distance; a pair is
  "same" when ``dist < threshold``.
* Folds are ``LFold``'s: ``sklearn.model_selection.KFold(n_splits=k, shuffle=False)``, i.e. contiguous,
  the first ``n % k`` folds one pair longer (uneven folds are evaluated as upstream, with a warning);
  ``k == 1`` trains and tests on all pairs. Fewer pairs than folds raises ``FoldError`` (where KFold
  raises its ValueError), naming the fix.
* Per fold, the first threshold of ``np.arange(0, 4, 0.01)`` with the best training accuracy is applied to
  the test fold; VAL is measured at the threshold whose training FAR is 1e-3.

What differs from upstream, and why (the numbers do not; see tests/test_verification.py and
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
* NaN/Inf embeddings (a diverged model) give NaN distances that never count as "same" instead of
  sklearn's ``normalize`` raising.
"""
import logging
from typing import NamedTuple

import numpy as np
from sklearn.preprocessing import normalize

from iterators.formats.pairs import fold_slices

logger = logging.getLogger(__name__)

#: ROC threshold grid of ``evaluate`` (400 values 0.00 ... 3.99): squared distances of unit vectors.
ROC_THRESHOLDS = np.arange(0, 4, 0.01)
#: VAL@FAR threshold grid of ``evaluate`` (4000 values 0.000 ... 3.999).
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
#: The FAR at which ``evaluate`` reports VAL (= TPR), as insightface/FaceNet.
FAR_TARGET = 1e-3


class FoldError(ValueError):
    """Pairs that cannot be split into the requested folds (fewer pairs than folds)."""


# ------------------------------------------------------------------------------------ folds


def check_folds(nrof_pairs, nrof_folds, what=None, warn=True):
    """Validate a fold split before evaluating; return True when the folds are uneven.

    ``nrof_pairs >= nrof_folds`` is needed for ``nrof_folds > 1`` (upstream's ``KFold`` raises
    "Cannot have number of splits n_splits=10 greater than the number of samples"); this raises
    ``FoldError`` naming ``what`` (e.g. the pack's path) and the two fixes. Uneven folds (pair count
    not a multiple of the folds) are legal, as upstream: True is returned and, with ``warn``, a
    warning logged.
    """
    if isinstance(nrof_folds, bool) or int(nrof_folds) != nrof_folds or nrof_folds < 1:
        raise ValueError(f"nrof_folds must be a positive integer, got {nrof_folds!r}")
    nrof_folds = int(nrof_folds)
    label = f"{what}: " if what else ""
    if nrof_folds == 1:
        return False
    if nrof_pairs < nrof_folds:
        raise FoldError(
            f"{label}{nrof_pairs} pairs cannot be split into {nrof_folds} folds (insightface's LFold/sklearn "
            f"KFold raises here too); evaluate with at most {max(nrof_pairs, 1)} folds (nfolds= / --nfolds) or "
            f"use a pack with at least {nrof_folds} pairs (python -m eval.build_bin --num-pairs "
            f"{2 * nrof_folds} ...)")
    extra = nrof_pairs % nrof_folds
    if extra and warn:
        base = nrof_pairs // nrof_folds
        logger.warning("%s%d pairs in %d folds: uneven folds (the first %d hold %d pairs, the other %d hold %d), "
                       "evaluated as insightface's LFold/KFold; a multiple of %d pairs gives equal folds",
                       label, nrof_pairs, nrof_folds, extra, base + 1, nrof_folds - extra, base, nrof_folds)
    return bool(extra)


def kfold(nrof_pairs, nrof_folds):
    """``[(train_index, test_index)]`` of insightface's ``LFold`` (``KFold(shuffle=False)``), no checks logged.

    ``nrof_folds == 1``: one "fold" trains and tests on all pairs. Raises ``FoldError`` when
    ``1 < nrof_folds`` and there are fewer pairs than folds (see ``check_folds``).
    """
    if isinstance(nrof_folds, bool) or int(nrof_folds) != nrof_folds or nrof_folds < 1:
        raise ValueError(f"nrof_folds must be a positive integer, got {nrof_folds!r}")
    indices = np.arange(nrof_pairs)
    if nrof_folds == 1:
        return [(indices, indices)]
    if nrof_pairs < nrof_folds:
        check_folds(nrof_pairs, nrof_folds)  # raises FoldError with the fixes
    out = []
    for sl in fold_slices(nrof_pairs, int(nrof_folds)):
        test_idx = indices[sl]
        train_idx = np.concatenate([indices[:sl.start], indices[sl.stop:]])
        out.append((train_idx, test_idx))
    return out


def _checked_folds(nrof_pairs, nrof_folds, what=None):
    check_folds(nrof_pairs, nrof_folds, what)
    return kfold(nrof_pairs, nrof_folds)


# ------------------------------------------------------------------------------ per threshold


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


# ------------------------------------------------------------------------- all thresholds at once


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


def _pca_distance(embeddings1, embeddings2, train_set, pca):
    from sklearn.decomposition import PCA
    train = np.concatenate((embeddings1[train_set], embeddings2[train_set]))
    model = PCA(n_components=pca).fit(train)
    e1 = normalize(model.transform(embeddings1))
    e2 = normalize(model.transform(embeddings2))
    return _squared_distance(e1, e2)


# ---------------------------------------------------------------------------------------- ROC


def calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10, pca=0):
    """K-fold ROC and accuracy (insightface's ``calculate_roc``), all thresholds at once.

    Parameters
    ----------
    thresholds : (T,) array
        Candidate thresholds on the squared distance ``dist = sum((e1 - e2)**2, axis=1)``.
    embeddings1, embeddings2 : (N, D) arrays
        First and second embedding of each pair (unit vectors in practice, so dist in [0, 4]).
    actual_issame : (N,) bool
    nrof_folds : int
        ``LFold`` folds: contiguous, the first ``N % k`` one pair longer (warned); 1 = train and test on all.
    pca : int
        > 0: per fold, fit ``sklearn.decomposition.PCA(pca)`` on the training embeddings, project
        and L2-normalise all embeddings, recompute ``dist`` (as upstream; unused by ``test``).

    Returns
    -------
    tpr, fpr : (T,) arrays
        Mean over folds of the test-fold TPR/FPR at each threshold.
    accuracy : (nrof_folds,) array
        Test-fold accuracy at the first threshold maximising the training-fold accuracy.

    Raises
    ------
    FoldError
        Fewer pairs than folds (``nrof_folds > 1``).
    """
    embeddings1, embeddings2, actual_issame, nrof_pairs = _pair_inputs(embeddings1, embeddings2, actual_issame)
    return _calculate_roc(thresholds, embeddings1, embeddings2, actual_issame,
                          _checked_folds(nrof_pairs, nrof_folds), pca)


def _calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, folds, pca):
    if pca > 0:
        def dist_for(train_set):
            return _pca_distance(embeddings1, embeddings2, train_set, pca)
    else:
        dist = _squared_distance(embeddings1, embeddings2)

        def dist_for(train_set):
            return dist
    return _roc(np.asarray(thresholds), dist_for, actual_issame, folds)


def roc_from_distances(thresholds, dist, actual_issame, nrof_folds=10):
    """``calculate_roc`` on precomputed pair distances ``dist`` (N,); same returns."""
    dist = np.asarray(dist)
    actual_issame = np.asarray(actual_issame, dtype=bool)
    nrof_pairs = min(len(actual_issame), len(dist))
    return _roc(np.asarray(thresholds), lambda train_set: dist, actual_issame,
                _checked_folds(nrof_pairs, nrof_folds))


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


# ------------------------------------------------------------------------------------ VAL@FAR


def _threshold_at_far(far_train, thresholds, far_target):
    """Threshold whose training FAR is ``far_target`` (replacement for ``interp1d(..., 'slinear')``).

    ``far_train[t]`` is a non-decreasing step function of the threshold and repeats values, which
    SciPy >= 1.9's ``interp1d`` refuses. Keep, for each distinct FAR, the first (lowest) threshold
    reaching it, and interpolate linearly between those points (``np.interp``, clamped at the ends).
    """
    far_values, first_index = np.unique(far_train, return_index=True)
    return float(np.interp(far_target, far_values, thresholds[first_index]))


def calculate_val(thresholds, embeddings1, embeddings2, actual_issame, far_target, nrof_folds=10):
    """K-fold VAL (true accept rate) at a target FAR (insightface's ``calculate_val``).

    Per fold: FAR on the training pairs for every threshold; if it reaches ``far_target``, the
    threshold is interpolated at ``far_target`` (see ``_threshold_at_far``), else 0; VAL and FAR are
    then measured on the test fold with ``dist < threshold``. Folds as ``calculate_roc``.

    Returns
    -------
    val_mean, val_std, far_mean : float
        Mean and std (ddof 0) of the test-fold VAL, mean test-fold FAR.
    """
    embeddings1, embeddings2, actual_issame, nrof_pairs = _pair_inputs(embeddings1, embeddings2, actual_issame)
    return _val(np.asarray(thresholds), _squared_distance(embeddings1, embeddings2), actual_issame, far_target,
                _checked_folds(nrof_pairs, nrof_folds))


def val_from_distances(thresholds, dist, actual_issame, far_target, nrof_folds=10):
    """``calculate_val`` on precomputed pair distances ``dist`` (N,); same returns."""
    dist = np.asarray(dist)
    actual_issame = np.asarray(actual_issame, dtype=bool)
    folds = _checked_folds(min(len(actual_issame), len(dist)), nrof_folds)
    return _val(np.asarray(thresholds), dist, actual_issame, far_target, folds)


def _val(thresholds, dist, actual_issame, far_target, folds):
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


# ------------------------------------------------------------------------------------- evaluate


def evaluate(embeddings, actual_issame, nrof_folds=10, pca=0):
    """insightface's ``evaluate``: rows ``2i`` and ``2i+1`` of ``embeddings`` form pair i.

    Parameters
    ----------
    embeddings : (2N, D) array
        Normalised embeddings (``test`` passes the L2-normalised flip sums).
    actual_issame : (N,) bool
    nrof_folds : int
        ``LFold`` folds (uneven when N is not a multiple: warned once, evaluated as upstream).

    Returns
    -------
    tpr, fpr : (400,) arrays (mean ROC over folds on ``ROC_THRESHOLDS``)
    accuracy : (nrof_folds,) array
    val, val_std, far : float (VAL@FAR=1e-3 on ``VAL_THRESHOLDS``)

    Raises
    ------
    FoldError
        Fewer pairs than folds.
    """
    return _evaluate(embeddings, actual_issame, nrof_folds, pca)


def _evaluate(embeddings, actual_issame, nrof_folds=10, pca=0, what=None):
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"embeddings must be (2N, D) with rows 2i, 2i+1 = pair i; got shape {embeddings.shape}")
    embeddings1, embeddings2, issame, nrof_pairs = _pair_inputs(embeddings[0::2], embeddings[1::2],
                                                                 np.asarray(actual_issame))
    folds = _checked_folds(nrof_pairs, nrof_folds, what)  # one check (and uneven-fold warning) for both
    tpr, fpr, accuracy = _calculate_roc(ROC_THRESHOLDS, embeddings1, embeddings2, issame, folds, pca)
    val, val_std, far = _val(VAL_THRESHOLDS, _squared_distance(embeddings1, embeddings2), issame, FAR_TARGET,
                             folds)
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


# ----------------------------------------------------------------------- flip protocol (test)


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


def evaluate_embeddings(embeddings_list, issame_list, nfolds=10, infer_time=0.0, what=None):
    """The flip protocol of insightface's ``test`` on precomputed raw embeddings.

    Parameters
    ----------
    embeddings_list : [(2N, D) array, (2N, D) array]
        Raw embeddings of the images and of their horizontal flips.
    issame_list : (N,) bool
    nfolds : int
    infer_time : float
        Stored on the result.
    what : str or None
        Names the pack in fold errors and warnings.

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
    tpr, fpr, accuracy, val, val_std, far = _evaluate(embeddings, issame_list, nrof_folds=nfolds, what=what)
    acc2, std2 = float(np.mean(accuracy)), float(np.std(accuracy))
    return VerificationResult.build(0.0, 0.0, acc2, std2, xnorm, list(embeddings_list), accuracy=accuracy,
                                    tpr=tpr, fpr=fpr, val=float(val), val_std=float(val_std), far=float(far),
                                    infer_time=infer_time)


def _as_numpy(array):
    """An ``mx.nd.NDArray`` (duck-typed: ``asnumpy``) or array-like as a numpy array."""
    return array.asnumpy() if hasattr(array, "asnumpy") else np.asarray(array)


def pixel_baseline(data_set, nfolds=10):
    """Raw-pixel verification baseline, to print next to a model's accuracy.

    The "network" is: flatten the image and subtract the pack's mean image. Everything else is
    ``test``'s protocol (flip sum, L2 normalisation, 10-fold accuracy). A model that does not beat
    this has not learned faces. Holds the whole pack as a ``(2N, 3*H*W)`` float32 array, so it is
    meant for small packs (demo, tests).

    Parameters
    ----------
    data_set : (data_list, issame_list) as ``load_bin`` returns (NDArrays or numpy arrays)

    Returns
    -------
    VerificationResult (``infer_time`` 0)
    """
    data_list, issame_list = data_set[0], data_set[1]
    flat = [_as_numpy(d).reshape(d.shape[0], -1) for d in data_list]
    mean = flat[0].mean(axis=0, dtype=np.float64).astype(np.float32)  # flipping permutes pixels only
    flip_mean = flat[1].mean(axis=0, dtype=np.float64).astype(np.float32)
    return evaluate_embeddings([flat[0] - mean, flat[1] - flip_mean], issame_list, nfolds=nfolds,
                               what=getattr(data_set, "path", None))


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
