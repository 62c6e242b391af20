"""Face verification on insightface `.bin` packs: loading, ``test`` and ``python -m eval.verification``.

Same names, arguments, numbers and console lines as insightface's
``recognition/arcface_mxnet/verification.py`` (``load_bin``, ``test``, ``main``). The module is split in
three (see docs/verification.md); every name is importable from here:

* ``eval.protocol`` (numpy only): folds (``LFold``), ``calculate_accuracy``, ``calculate_roc``,
  ``calculate_val``, ``calculate_val_far``, ``evaluate``, ``evaluate_embeddings``, ``pixel_baseline``,
  ``VerificationResult``, ``format_lines``;
* ``eval.inference``: ``embed`` (plain or flip-summed embeddings with a bound Module) and
  ``load_embedding_module`` (a checkpoint cut at ``fc1_output``);
* here: ``load_bin``, ``test`` and the CLI.

``load_bin(path, image_size)`` decodes a pack (RGB as ``mx.image.imdecode``, in a thread pool) into two float32
``(2N, 3, H, W)`` NDArrays, the images and their horizontal flips; it loads any well-formed pack, whatever
its pair count (as upstream). ``test(data_set, mx_model, batch_size, nfolds)`` embeds both, sums the two raw
embeddings of each image, L2-normalises the sums and runs ``evaluate`` -> "Accuracy-Flip" (mean ± std over
folds, ddof 0). Folds are upstream's ``LFold``: a pair count that is not a multiple of ``nfolds`` gives
uneven folds (the first ``N % nfolds`` one pair longer; a warning is logged); fewer pairs than folds raises
``FoldError`` naming the pack and the fix, before any forward pass.

What differs from upstream: packs are read with ``iterators.formats.bin_pack.read_bin`` (restricted
unpickler: nothing in the file is executed) and structurally checked (odd image count, issame length,
undecodable or wrongly sized image); ``test`` works for packs smaller than the batch (zero-padded batch,
padded rows dropped); the protocol's differences are listed in ``eval.protocol``.
"""
import argparse
import concurrent.futures
import json
import logging
import os
import re
import sys
import threading
import time

import cv2
import mxnet as mx
import numpy as np

from eval.inference import Embeddings, ModelLoadError, embed, load_embedding_module
from eval.protocol import (FAR_TARGET, ROC_THRESHOLDS, VAL_THRESHOLDS, FoldError, VerificationResult,
                           _normalize_rows, _threshold_at_far, calculate_accuracy, calculate_roc, calculate_val,
                           calculate_val_far, check_folds, evaluate, evaluate_embeddings, format_lines, kfold,
                           pixel_baseline, roc_from_distances, tpr_at_far, val_from_distances)
from eval.runtime import configure_threads
from iterators.formats.atomic import PRIVATE_FILE, atomic_write_text
from iterators.formats.bin_pack import PackFormatError, read_bin
from iterators.formats.cli import run_cli
from iterators.formats.images import parse_image_size

logger = logging.getLogger(__name__)

__all__ = [
    "load_bin", "test", "VerificationSet", "main", "build_parser", "parse_model_arg", "find_epochs", "plot_roc",
    # eval.protocol
    "ROC_THRESHOLDS", "VAL_THRESHOLDS", "FAR_TARGET", "FoldError", "VerificationResult", "calculate_accuracy",
    "calculate_roc", "calculate_val", "calculate_val_far", "check_folds", "evaluate", "evaluate_embeddings",
    "format_lines", "kfold", "pixel_baseline", "roc_from_distances", "tpr_at_far", "val_from_distances",
    "_threshold_at_far",
    # eval.inference
    "Embeddings", "ModelLoadError", "embed", "load_embedding_module",
    # iterators.formats.bin_pack
    "PackFormatError",
]

#: Images per decode task of ``load_bin``'s thread pool.
_DECODE_CHUNK = 64
#: Bytes at the start of a JPEG searched for an EXIF segment (orientation: such images take the mx.image path).
_EXIF_SCAN = 4096


# ----------------------------------------------------------------------------------- loading


class VerificationSet(tuple):
    """``(data_list, issame_list)`` as upstream's ``load_bin`` returns it, plus ``.path`` (names the pack
    in fold errors and warnings). Unpacks and indexes as the plain 2-tuple."""

    def __new__(cls, data_list, issame_list, path=None):
        self = super().__new__(cls, (data_list, issame_list))
        self.path = path
        return self


def load_bin(path, image_size, num_workers=None):
    """Load a verification pack as insightface's ``load_bin`` does; any well-formed pack, whatever its pair count.

    Parameters
    ----------
    path : str
        ``<name>.bin``: pickled ``(bins, issame_list)`` (Python 2 or 3, bytes or cv2 arrays).
    image_size : (int, int)
        ``(H, W)``. As upstream, an image whose *width* differs from ``image_size[0]`` is resized
        with ``mx.image.resize_short(img, image_size[0])``; the result must then be ``H x W``.
    num_workers : int or None
        Decode threads (None: one per core; 0: decode in the calling thread). JPEG and PNG images are
        decoded with ``cv2.imdecode`` (releases the GIL), which gives the RGB arrays of ``mx.image.imdecode``
        bitwise (checked by the tests); any other image, one with EXIF data, one cv2 cannot decode and the
        resize case go through ``mx.image`` as upstream (serialised by a lock). The outputs do not depend on
        ``num_workers``.

    Returns
    -------
    VerificationSet, i.e. ``(data_list, issame_list)``
        ``data_list``: ``[images, flipped]``, float32 ``(2N, 3, H, W)`` RGB 0..255 NDArrays;
        ``issame_list``: list of N bools. Fold counts are checked when evaluating (``test``), not here.

    Raises
    ------
    FileNotFoundError, iterators.formats.bin_pack.PackFormatError
        Missing file; unsafe/unreadable pickle; odd image count; issame length mismatch; an image that
        cannot be decoded or has the wrong size.
    """
    path = os.fspath(path)
    height, width = (int(v) for v in image_size)
    bins, issame_list = read_bin(path)
    genuine = sum(1 for x in issame_list if x)
    if issame_list and genuine in (0, len(issame_list)):
        logger.warning("%s: all %d pairs are %s: its accuracy is meaningless (a constant answer scores 100%%); "
                       "rebuild it with both genuine and impostor pairs (python -m eval.build_bin)", path,
                       len(issame_list), "impostor (different people)" if genuine == 0 else "genuine (same person)")
    count = len(bins)
    # Both outputs are filled in place by the workers, then handed to MXNet without a copy.
    images = np.empty((count, 3, height, width), dtype=np.float32)
    flipped = np.empty((count, 3, height, width), dtype=np.float32)

    def decode_range(start, stop):
        for i in range(start, stop):
            bgr = _decode_pack_image(path, i, bins[i], height, width)
            _bgr_to_chw_float(bgr, images[i])
            _bgr_to_chw_float(cv2.flip(bgr, 1), flipped[i])

    ranges = [(a, min(a + _DECODE_CHUNK, count)) for a in range(0, count, _DECODE_CHUNK)]
    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    if workers > 0 and len(ranges) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(ranges)), "load_bin") as pool:
            for task in [pool.submit(decode_range, a, b) for a, b in ranges]:
                task.result()  # re-raises the first PackFormatError
    else:
        for a, b in ranges:
            decode_range(a, b)
    data_list = [mx.nd.from_numpy(images, zero_copy=True), mx.nd.from_numpy(flipped, zero_copy=True)]
    logger.info("%s: %s", path, data_list[0].shape)
    return VerificationSet(data_list, issame_list, path)


_JPEG_MAGIC, _PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
_MX_LOCK = threading.Lock()


def _bgr_to_chw_float(img, out):
    """HWC uint8 BGR -> ``out`` (3 x H x W float32 RGB): contiguous planes cast into place (GIL released)."""
    b, g, r = cv2.split(img)
    out[0], out[1], out[2] = r, g, b


def _decode_pack_image(path, i, payload, height, width):
    """Image ``i`` of a pack as HWC uint8 BGR, equal (after BGR->RGB) to upstream's ``mx.image.imdecode``
    (+ ``resize_short`` when the width differs from ``height``); raises ``PackFormatError`` naming the image."""
    head = bytes(payload[:8])
    if head.startswith(_JPEG_MAGIC) and b"Exif" not in bytes(payload[:_EXIF_SCAN]) or head == _PNG_MAGIC:
        img = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is not None and img.shape[1] == height and img.shape[:2] == (height, width):
            return img
    with _MX_LOCK:  # upstream's path: anything else, undecodable or to be resized
        try:
            img = mx.image.imdecode(payload)
        except mx.base.MXNetError as exc:
            raise PackFormatError(f"{path}: image {i} (pair {i // 2}) cannot be decoded: "
                                  f"{str(exc).strip().splitlines()[-1]}") from None
        if img.shape[1] != height:  # upstream compares the width with image_size[0]
            img = mx.image.resize_short(img, height)
        img = img.asnumpy()
    if img.shape[:2] != (height, width):
        raise PackFormatError(
            f"{path}: image {i} (pair {i // 2}) is {img.shape[0]}x{img.shape[1]} after resize_short "
            f"to {height}; expected {height}x{width}. Pack images must be aligned crops with "
            "the aspect ratio of image_size (rebuild with python -m eval.build_bin --image-size)")
    return cv2.cvtColor(img, cv2.COLOR_RGB2BGR)


# ------------------------------------------------------------------------------ model test


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
        ``LFold`` folds; uneven folds are evaluated (with a warning), fewer pairs than folds raise
        ``FoldError`` naming the pack before anything is embedded.
    data_extra : array or None
        Second data input fed with every batch (upstream's ``data_extra``).

    Returns
    -------
    VerificationResult
        Unpacks as ``(acc1, std1, acc2, std2, xnorm, embeddings_list)``; see ``evaluate_embeddings``.
    """
    logger.info("testing verification..")
    data_list, issame_list = data_set[0], data_set[1]
    what = getattr(data_set, "path", None) or "verification pack"
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nrof_pairs = min(len(issame_list), data_list[0].shape[0] // 2)
    check_folds(nrof_pairs, nfolds, what, warn=False)  # fail before any forward pass; evaluate warns
    out = embed(data_list[0], mx_model, batch_size, flip=True, flipped=data_list[1], data_extra=data_extra,
                label_shape=label_shape)
    logger.info("infer time %f", out.seconds)
    return evaluate_embeddings(out.views, issame_list, nfolds=nfolds, infer_time=out.seconds, what=what)


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


def _read_image_size(data_dir, flag):
    prop = os.path.join(data_dir, "property")
    if flag:
        size = parse_image_size(flag)
        if os.path.isfile(prop):
            from iterators.formats.recordio import read_property
            _, prop_size = read_property(data_dir)
            if tuple(prop_size) != tuple(size):
                raise ValueError(f"--image-size {flag} but {prop} says the images are {prop_size[0]}x{prop_size[1]}: "
                                 "every face would be rescaled; drop --image-size (read from property) or fix it")
        return size
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
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n", mode=PRIVATE_FILE)


def plot_roc(curves, path):
    """Save ROC curves ``[(label, far, tpr)]`` to ``path`` with a log-scaled FAR axis (``eval.roc.plot_roc``).

    The CLI draws the all-pairs ROC of each target and epoch (``eval.roc.roc_points``)."""
    from eval.roc import plot_roc as _plot_roc
    return _plot_roc(curves, path)


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
    parser.add_argument("--mode", type=int, default=0, choices=(0, 1),
                        help="0: verify; 1: insightface's test_badcase on the first target and model (PNG grids of "
                             "the misclassified pairs with their distances, eval.badcase)")
    parser.add_argument("--badcase-dir", default="./badcases", help="--mode 1 output directory")
    return parser


def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m eval.verification")


def _main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cpu and args.gpu is not None:
        parser.error("--gpu and --cpu are mutually exclusive")
    if args.batch_size < 1 or args.nfolds < 1:
        parser.error("--batch-size and --nfolds must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_threads()
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
            ver_list.append(load_bin(path, image_size))
            ver_names.append(name)
    if not ver_list:
        raise FileNotFoundError(f"none of the targets {args.target} has a .bin in {args.data_dir or '.'}")

    if args.mode == 1:  # upstream: test_badcase(ver_list[0], nets[0], batch_size, target)
        from eval.badcase import test_badcase
        test_badcase(ver_list[0], nets[0][1], args.batch_size, ver_names[0], args.badcase_dir, args.nfolds)
        return 0
    from eval.roc import format_tpr_at_fars, pair_distances, roc_points, tpr_at_fars
    records, curves = [], []
    for name, data_set in zip(ver_names, ver_list):
        accs = []
        for epoch, model in nets:
            result = test(data_set, model, args.batch_size, args.nfolds)
            for line in format_lines(name, result):
                print(line)
            accs.append(result.acc2)
            dist = pair_distances(_normalize_rows(result.embeddings_list[0] + result.embeddings_list[1]))
            issame = np.asarray(data_set[1], dtype=bool)[:len(dist)]
            table = tpr_at_fars(dist, issame)
            for line in format_tpr_at_fars(name, table, int((~issame).sum())):
                print(line)
            far, tpr, _ = roc_points(dist, issame)
            curves.append((f"{name} epoch {epoch} ({result.acc2:.4f})", far, tpr))
            records.append({"target": name, "epoch": epoch, "xnorm": result.xnorm,
                            "accuracy_flip": result.acc2, "accuracy_flip_std": result.std2,
                            "fold_accuracy": [float(a) for a in result.accuracy],
                            "tpr_at_far_1e-3": result.val, "tpr_at_far_1e-3_std": result.val_std,
                            "far": result.far, "num_pairs": len(data_set[1]), "infer_time": result.infer_time,
                            "roc_tpr_at_far": {f"{f:.0e}": v for f, v in table.items()}})
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
