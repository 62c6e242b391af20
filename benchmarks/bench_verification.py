"""Verification speed: vectorised ``eval.protocol`` (re-exported by ``eval.verification``) vs a per-threshold
loop port of insightface's ``recognition/arcface_mxnet/verification.py``.

Run: ``python -m benchmarks.bench_verification [--output benchmarks/results] [--repeats 5]``
(about half a minute on 2 cores, mostly the loop port).

Data: 6,000 pairs (LFW/AgeDB-30 size) of L2-normalised 512-d float32 embeddings, as ``test`` passes
them to ``evaluate``: genuine pairs are noisy copies, impostors independent, so accuracy sits in the
high 90s rather than at a trivial 0.5 or 1.0. 10 contiguous folds.

Timed, for both implementations:
1. ``calculate_roc`` with the 400 thresholds ``np.arange(0, 4, 0.01)`` (the printed accuracy);
2. ``evaluate`` = that ROC + ``calculate_val`` on 4,000 thresholds (VAL@FAR=1e-3).

The loop port below is insightface/FaceNet's algorithm (``calculate_roc``, ``calculate_val``, ``LFold`` =
sklearn ``KFold``; one pass over the pairs per threshold, scalar ``dist < threshold``), with ``interp1d``
replaced by the library's documented rule (SciPy >= 1.9 cannot run the original). The benchmark asserts
that every returned array and number is identical (``np.array_equal`` / ``==``), then writes ``<output>/verification.json``.
"""
import argparse
import json
import os
import platform
import time

import numpy as np
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from eval import verification
from iterators.formats.atomic import atomic_write_text

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

NUM_PAIRS = 6000
EMB_SIZE = 512
NFOLDS = 10
GENUINE_NOISE = 5.0  # per-dimension noise std relative to the unit-variance identity vector (accuracy ~0.99)


def loop_calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def loop_calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    nrof_thresholds = len(thresholds)
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    tprs = np.zeros((nrof_folds, nrof_thresholds))
    fprs = np.zeros((nrof_folds, nrof_thresholds))
    accuracy = np.zeros(nrof_folds)
    indices = np.arange(nrof_pairs)
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)
    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        acc_train = np.zeros(nrof_thresholds)
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = loop_calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        for threshold_idx, threshold in enumerate(thresholds):
            tprs[fold_idx, threshold_idx], fprs[fold_idx, threshold_idx], _ = loop_calculate_accuracy(
                threshold, dist[test_set], actual_issame[test_set])
        _, _, accuracy[fold_idx] = loop_calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set])
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy


def loop_calculate_val_far(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    return float(true_accept) / float(n_same), float(false_accept) / float(n_diff)


def loop_calculate_val(thresholds, embeddings1, embeddings2, actual_issame, far_target, nrof_folds=10):
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    val = np.zeros(nrof_folds)
    far = np.zeros(nrof_folds)
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)
    indices = np.arange(nrof_pairs)
    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        far_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = loop_calculate_val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= far_target:
            # interp1d(far_train, thresholds, kind='slinear') replaced: first threshold per distinct FAR
            far_values, first = np.unique(far_train, return_index=True)
            threshold = np.interp(far_target, far_values, thresholds[first])
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = loop_calculate_val_far(threshold, dist[test_set], actual_issame[test_set])
    return np.mean(val), np.std(val), np.mean(far)


def loop_evaluate(embeddings, actual_issame, nrof_folds=10):
    e1, e2 = embeddings[0::2], embeddings[1::2]
    tpr, fpr, accuracy = loop_calculate_roc(np.arange(0, 4, 0.01), e1, e2, np.asarray(actual_issame), nrof_folds)
    val, val_std, far = loop_calculate_val(np.arange(0, 4, 0.001), e1, e2, np.asarray(actual_issame), 1e-3, nrof_folds)
    return tpr, fpr, accuracy, val, val_std, far


def make_embeddings(seed=0):
    """(2*NUM_PAIRS, EMB_SIZE) float32 unit rows (pair i = rows 2i, 2i+1) and the issame list."""
    rng = np.random.default_rng(seed)
    issame = np.tile(np.repeat([True, False], NUM_PAIRS // (2 * NFOLDS)), NFOLDS)  # LFW-like fold layout
    a = rng.normal(size=(NUM_PAIRS, EMB_SIZE))
    b = np.where(issame[:, None], a + GENUINE_NOISE * rng.normal(size=a.shape), rng.normal(size=a.shape))
    emb = np.empty((2 * NUM_PAIRS, EMB_SIZE))
    emb[0::2], emb[1::2] = a, b
    return normalize(emb.astype(np.float32)), issame


def _best_time(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - tic)
    return best, out


def _assert_identical(ours, ref, what):
    for k, (x, y) in enumerate(zip(ours, ref)):
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            raise AssertionError(f"{what}: output {k} differs between vectorised and loop implementations")


def run(repeats=5, loop_repeats=1, seed=0):
    emb, issame = make_embeddings(seed)
    e1, e2 = emb[0::2], emb[1::2]
    thresholds = np.arange(0, 4, 0.01)
    roc_vec_s, roc_vec = _best_time(lambda: verification.calculate_roc(thresholds, e1, e2, issame, NFOLDS), repeats)
    roc_loop_s, roc_loop = _best_time(lambda: loop_calculate_roc(thresholds, e1, e2, issame, NFOLDS), loop_repeats)
    _assert_identical(roc_vec, roc_loop, "calculate_roc")
    ev_vec_s, ev_vec = _best_time(lambda: verification.evaluate(emb, issame, NFOLDS), repeats)
    ev_loop_s, ev_loop = _best_time(lambda: loop_evaluate(emb, issame, NFOLDS), loop_repeats)
    _assert_identical(ev_vec, ev_loop, "evaluate")
    accuracy = ev_vec[2]
    return {
        "pairs": NUM_PAIRS, "emb_size": EMB_SIZE, "folds": NFOLDS, "dtype": "float32",
        "roc_thresholds": len(thresholds), "val_thresholds": len(verification.VAL_THRESHOLDS),
        "repeats_vectorised": repeats, "repeats_loop": loop_repeats,
        "calculate_roc": {"vectorised_s": roc_vec_s, "loop_s": roc_loop_s, "speedup": roc_loop_s / roc_vec_s},
        "evaluate": {"vectorised_s": ev_vec_s, "loop_s": ev_loop_s, "speedup": ev_loop_s / ev_vec_s},
        "identical_outputs": True,
        "accuracy_flip": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
        "tpr_at_far_1e-3": float(ev_vec[3]),
    }


def write_json(name, payload, results_dir=RESULTS_DIR):
    """Write ``payload`` with the machine context to ``<results_dir>/<name>.json`` (atomic); return the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    machine = {"python": platform.python_version(), "numpy": np.__version__, "cpu_count": os.cpu_count(),
               "loadavg_1_5_15": list(os.getloadavg()), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(path, json.dumps({"name": name, "machine": machine, **payload}, indent=2) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=RESULTS_DIR, help="results directory")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the vectorised code (best kept)")
    parser.add_argument("--loop-repeats", type=int, default=1, help="timed runs of the loop port (best kept)")
    args = parser.parse_args(argv)
    result = run(args.repeats, args.loop_repeats)
    path = write_json("verification", result, results_dir=args.output)
    for key in ("calculate_roc", "evaluate"):
        r = result[key]
        print(f"{key}: vectorised {r['vectorised_s'] * 1e3:.1f} ms, loop {r['loop_s'] * 1e3:.0f} ms, "
              f"x{r['speedup']:.0f} (identical outputs)")
    print(f"accuracy {result['accuracy_flip']:.5f}+-{result['accuracy_std']:.5f}, "
          f"TPR@FAR=1e-3 {result['tpr_at_far_1e-3']:.5f} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
