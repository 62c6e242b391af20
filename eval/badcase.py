"""``python -m eval.verification --mode 1``: the misclassified pairs of a pack as PNG grids, with their distances.

insightface's ``recognition/arcface_mxnet/verification.py`` ``test_badcase`` (its ``--mode 1``): embed the pack
(flip-summed, L2-normalised, as ``test``), split the pairs into ``LFold`` folds, pick each fold's best threshold on
its training pairs (first maximum over ``np.arange(0, 4, 0.01)``) and, on its test pairs, collect

* genuine pairs with ``dist - threshold > 0`` (false negatives), sorted by distance, largest first;
* impostor pairs with ``threshold - dist > 0`` (false positives), sorted by distance, smallest first.

Each list is drawn as upstream draws it: 4 columns, a cell = the two faces side by side (H x 2W, BGR) with the
squared distance written at ``(80, H/2 + 7)``, 10 px between columns, a 20 px band at the bottom with
``threshold: t`` (the threshold of the first false positive's fold, else of the last false negative's), white
background; files ``<out_dir>/<name>_positive(false_negative).png`` and ``<name>_negative(false_positive).png``
(a list that is empty gives no file, as upstream). Upstream's hand-picked replacement images for cfp's
positives (``hack``) are not reproduced. Also written: ``<name>_badcases.tsv`` (kind, pair, images, dist,
threshold) for tooling.
"""
import logging
import math
import os

import cv2
import numpy as np

from eval.inference import embed
from eval.protocol import (ROC_THRESHOLDS, _accuracy_curve, _compare_dtype, _normalize_rows, _rates, check_folds,
                           kfold)
from iterators.formats.atomic import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["find_badcases", "badcase_grid", "test_badcase", "COLS", "GAP", "TEXT_BAND"]

COLS = 4          # upstream: cols = 4
GAP = 10          # upstream: gap = 10 (pixels between columns)
TEXT_BAND = 20    # upstream: image height = rows * H + 20
TEXT_COLOR = (153, 255, 51)  # upstream's last text_color assignment (BGR)


def find_badcases(dist, issame, nrof_folds=10, thresholds=ROC_THRESHOLDS):
    """Misclassified test pairs of each fold at its best training threshold.

    Returns ``(false_negatives, false_positives, accuracy)``: lists of ``(pair, dist, threshold)`` sorted as
    upstream (FN by distance descending, FP ascending) and the mean test-fold accuracy.
    """
    dist = np.asarray(dist)
    issame = np.asarray(issame, dtype=bool)[:len(dist)]
    check_folds(len(dist), nrof_folds)
    thr = np.asarray(thresholds).astype(_compare_dtype(dist))
    pouts, nouts, accuracy = [], [], []
    for train_set, test_set in kfold(len(dist), nrof_folds):
        train_acc = _accuracy_curve(*_rates(dist[train_set], issame[train_set], thr))[2]
        best = int(np.argmax(train_acc))
        accuracy.append(_accuracy_curve(*_rates(dist[test_set], issame[test_set], thr))[2][best])
        threshold = float(thresholds[best])
        for pair in test_set:
            violate = float(dist[pair]) - threshold
            if not issame[pair]:
                violate = -violate
            if violate > 0.0:
                (pouts if issame[pair] else nouts).append((int(pair), float(dist[pair]), threshold))
    pouts.sort(key=lambda x: x[1], reverse=True)
    nouts.sort(key=lambda x: x[1])
    return pouts, nouts, float(np.mean(accuracy))


def _bgr(image):
    """(3, H, W) RGB float -> (H, W, 3) BGR uint8 (upstream: ``transpose((1, 2, 0))[..., ::-1]``)."""
    image = image.asnumpy() if hasattr(image, "asnumpy") else np.asarray(image)
    return np.clip(image.transpose(1, 2, 0)[..., ::-1], 0, 255).astype(np.uint8)


def badcase_grid(cases, images, threshold):
    """The grid image of ``cases`` ``[(pair, dist, threshold)]`` (module doc); ``images`` (2N, 3, H, W) RGB."""
    height, width = int(images.shape[2]), int(images.shape[3])
    rows = int(math.ceil(len(cases) / COLS))
    grid = np.full((height * rows + TEXT_BAND, 2 * width * COLS + (COLS - 1) * GAP, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = 0.6 * min(1.0, height / 112.0)
    for k, (pair, dist, _) in enumerate(cases):
        row, col = divmod(k, COLS)
        cell = np.ascontiguousarray(np.concatenate([_bgr(images[2 * pair]), _bgr(images[2 * pair + 1])], axis=1))
        x = min(80, max(0, 2 * width - 60))
        cv2.putText(cell, "%.3f" % dist, (x, height // 2 + 7), font, scale, TEXT_COLOR, 2)
        left = col * (2 * width + GAP)
        grid[row * height:(row + 1) * height, left:left + 2 * width] = cell
    cv2.putText(grid, "threshold: %.3f" % threshold, (max(0, grid.shape[1] // 2 - 70), grid.shape[0] - 5), font,
                0.6 * min(1.0, max(0.3, height / 112.0)), TEXT_COLOR, 2)
    return grid


def _write_png(path, image):
    def write(tmp):
        ok, data = cv2.imencode(".png", image)
        if not ok:
            raise OSError(f"cannot encode {path}")
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
    return atomic_write(path, write)


def test_badcase(data_set, mx_model, batch_size, name="", out_dir="./badcases", nfolds=10, data_extra=None,
                 label_shape=None):
    """insightface's ``test_badcase``: embed, find the bad pairs, write the PNG grids (module doc).

    Returns a dict: ``accuracy``, ``false_negatives``/``false_positives`` (lists of ``(pair, dist, threshold)``),
    ``files`` (PNG and TSV paths written).
    """
    logger.info("testing verification badcase..")
    data_list, issame_list = data_set[0], data_set[1]
    out = embed(data_list[0], mx_model, batch_size, flip=True, flipped=data_list[1], data_extra=data_extra,
                label_shape=label_shape)
    embeddings = _normalize_rows(out.embeddings)
    diff = embeddings[0::2] - embeddings[1::2]
    dist = np.sum(np.square(diff), 1)
    nrof_pairs = min(len(issame_list), dist.shape[0])
    pouts, nouts, acc = find_badcases(dist[:nrof_pairs], list(issame_list)[:nrof_pairs], nfolds)
    print(len(pouts), len(nouts))
    print("acc", acc)
    threshold = nouts[0][2] if nouts else (pouts[-1][2] if pouts else 0.0)
    os.makedirs(out_dir, exist_ok=True)
    files = []
    images = data_list[0]
    for cases, filename in ((pouts, "positive(false_negative).png"), (nouts, "negative(false_positive).png")):
        if not cases:
            continue
        if name:
            filename = name + "_" + filename
        path = os.path.join(out_dir, filename)
        _write_png(path, badcase_grid(cases, images, threshold))
        files.append(path)
    lines = ["kind\tpair\timage_a\timage_b\tdist\tthreshold"]
    for kind, cases in (("false_negative", pouts), ("false_positive", nouts)):
        lines += [f"{kind}\t{p}\t{2 * p}\t{2 * p + 1}\t{d:.6f}\t{t:.2f}" for p, d, t in cases]
    tsv = os.path.join(out_dir, (name + "_" if name else "") + "badcases.tsv")
    atomic_write_text(tsv, "\n".join(lines) + "\n")
    files.append(tsv)
    for path in files:
        print("badcases", path)
    return {"accuracy": acc, "false_negatives": pouts, "false_positives": nouts, "files": files}
