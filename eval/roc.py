"""ROC over all pairs with a log-scaled FAR axis, and TPR at FAR 1e-1 ... 1e-6 (the face-recognition convention).

The 10-fold protocol (``eval.protocol``) picks thresholds on a 0.01 grid and averages fold curves, which cannot
resolve low FARs. Here, as insightface's IJB evaluation (``recognition/_evaluation_/ijb/ijb_11.py``: sklearn
``roc_curve`` on all pair scores, plotted with ``plt.xscale('log')`` over FAR 1e-6 ... 1e-1), the curve is taken
over every pair of the pack at every distinct distance:

* a pair is accepted at threshold ``t`` when its squared distance ``dist <= t``; for the sorted distinct distances
  the curve points are ``(FAR, TPR) = (#negatives accepted / #negatives, #positives accepted / #positives)``,
  starting at ``(0, 0)``;
* ``TPR@FAR=f`` is the highest TPR of a point whose FAR is ``<= f`` (ijb_11.py takes the point whose FAR is
  nearest ``f``, which can report a TPR bought with a FAR above ``f``);
* it is reported only where the pack can measure it: with ``n`` negative pairs the smallest non-zero FAR is
  ``1/n``, so ``f < 1/n`` is "n/a" (None) — e.g. LFW's 3000 negative pairs allow 1e-1 ... 1e-3 only.
"""
import logging
import math
import os

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FAR_LEVELS", "pair_distances", "roc_points", "tpr_at_fars", "format_tpr_at_fars", "plot_roc"]

#: FARs of the TPR@FAR table.
FAR_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def pair_distances(embeddings):
    """Squared L2 distance of pairs ``(2i, 2i+1)`` of ``embeddings`` (2N, D) -> (N,)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    diff = embeddings[0::2] - embeddings[1::2]
    return np.sum(diff * diff, axis=1)


def roc_points(dist, issame):
    """``(far, tpr, thresholds)`` of the all-pairs ROC (module doc); ``far``/``tpr`` start at 0."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)[:len(dist)]
    dist = np.where(np.isfinite(dist), dist, np.inf)
    thresholds = np.unique(dist[np.isfinite(dist)])
    pos, neg = np.sort(dist[issame]), np.sort(dist[~issame])
    tpr = np.searchsorted(pos, thresholds, side="right") / max(pos.size, 1)
    far = np.searchsorted(neg, thresholds, side="right") / max(neg.size, 1)
    return np.concatenate([[0.0], far]), np.concatenate([[0.0], tpr]), np.concatenate([[-np.inf], thresholds])


def tpr_at_fars(dist, issame, fars=FAR_LEVELS):
    """``{far: tpr or None}``: highest TPR at FAR <= far; None where ``far < 1 / #negative pairs``."""
    issame = np.asarray(issame, dtype=bool)[:len(dist)]
    negatives = int((~issame).sum())
    far, tpr, _ = roc_points(dist, issame)
    out = {}
    for f in fars:
        if negatives == 0 or f * negatives < 1 - 1e-9:
            out[f] = None
        else:
            out[f] = float(tpr[far <= f + 1e-12].max())
    return out


def format_tpr_at_fars(name, table, negatives=None):
    """Console lines ``[name]ROC TPR@FAR=1e-04: 0.93333`` (``n/a (300 negative pairs)`` when unmeasurable)."""
    lines = []
    for f, value in table.items():
        if value is None:
            why = f" ({negatives} negative pairs)" if negatives is not None else ""
            lines.append(f"[{name}]ROC TPR@FAR={f:.0e}: n/a{why}")
        else:
            lines.append(f"[{name}]ROC TPR@FAR={f:.0e}: {value:1.5f}")
    return lines


def plot_roc(curves, path, min_far=None):
    """Save ROC curves ``[(label, far, tpr)]`` to ``path`` with a log-scaled FAR axis.

    Points with FAR 0 cannot be drawn on a log axis; the axis starts at ``min_far`` (default: the smallest
    non-zero FAR of the curves, rounded down to a power of ten, at most 1e-1).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nonzero = [np.min(far[far > 0]) for _, far, _ in curves if np.any(np.asarray(far) > 0)]
    if min_far is None:
        min_far = 10.0 ** math.floor(math.log10(min(nonzero))) if nonzero else 1e-3
        min_far = min(min_far, 1e-1)
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, far, tpr in curves:
        far, tpr = np.asarray(far), np.asarray(tpr)
        keep = far > 0
        ax.plot(far[keep], tpr[keep], label=label)
    ax.set_xscale("log")
    ax.set_xlim(min_far, 1.0)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (log scale)")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="major", linestyle=":", linewidth=0.6)
    ax.set_title("verification ROC (all pairs)")
    ax.legend(loc="lower right", fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
