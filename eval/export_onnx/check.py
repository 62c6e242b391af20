"""Proof that an exported model computes the checkpoint's embedding: ONNX Runtime against MXNet.

``check(onnx_path, prefix, epoch, ...)`` embeds the same images with ONNX Runtime and with the checkpoint in MXNet
(``eval.inference.load_embedding_module``: the original graph cut at ``fc1_output``, not the rewritten one) and
reports ``max |onnx - mxnet| / max |mxnet|`` over

- random images (uniform RGB 0..255, seeded), and
- optionally a verification pack (``.bin``): its images and their flips; then also the 10-fold Accuracy-Flip of
  both embeddings with insightface's protocol (``eval.protocol.evaluate_embeddings``), which must be equal.

Passing means the relative difference is at most ``tolerance`` (1e-4) and, with a pack, equal accuracies.
"""
import json
import logging
import time

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
DEFAULT_RANDOM_IMAGES = 16


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        from .exporter import OnnxExportError
        raise OnnxExportError(f"--check needs onnxruntime ({exc}); install it with pip install -e \".[onnx]\"") \
            from None
    return onnxruntime


def session(path, threads=None):
    """An ONNX Runtime CPU ``InferenceSession`` for ``path``."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_embed(sess, images, batch_size=32):
    """(n, D) embeddings of ``images`` (n, 3, H, W) RGB 0..255 with an ONNX Runtime session.

    A fixed-batch model is fed exactly its batch (the last window zero-padded, padded rows dropped); a
    dynamic-batch one windows of ``batch_size``.
    """
    images = np.asarray(images.asnumpy() if hasattr(images, "asnumpy") else images, dtype=np.float32)
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or batch_size
    outs = []
    for start in range(0, len(images), step):
        window = images[start:start + step]
        n = len(window)
        if fixed and n < fixed:
            window = np.concatenate([window, np.zeros((fixed - n,) + window.shape[1:], np.float32)])
        outs.append(sess.run(None, {inp.name: window})[0][:n])
    return np.concatenate(outs).reshape(len(images), -1)


def mxnet_embed(module, images, batch_size):
    """(n, prod(output shape)) outputs of a bound inference Module, in zero-padded windows of ``batch_size``.

    Unlike ``eval.inference.embed`` any output rank is accepted (the ``Z`` head's embedding is a 4-D map).
    """
    import mxnet as mx

    images = np.asarray(images.asnumpy() if hasattr(images, "asnumpy") else images, dtype=np.float32)
    outs = []
    for start in range(0, len(images), batch_size):
        window = images[start:start + batch_size]
        n = len(window)
        if n < batch_size:
            window = np.concatenate([window, np.zeros((batch_size - n,) + window.shape[1:], np.float32)])
        module.forward(mx.io.DataBatch(data=(mx.nd.array(window),)), is_train=False)
        outs.append(module.get_outputs()[0].asnumpy()[:n].reshape(n, -1))
    return np.concatenate(outs)


def reference_module(prefix, epoch, batch_size, image_size):
    """(inference Module of the checkpoint, note): ``eval.inference.load_embedding_module``.

    A symbol naming the optional ``fused_prelu`` operator loads only in a process that loaded its library; then
    the reference is the same checkpoint with those nodes read as ``LeakyReLU(prelu)`` (same forward function;
    ``eval.symbol_rewrite``), and the note says so.
    """
    import mxnet as mx

    from eval.inference import load_embedding_module

    try:
        return load_embedding_module(prefix, epoch, mx.cpu(), batch_size, image_size), ""
    except mx.base.MXNetError as exc:
        if "fused_prelu" not in str(exc):
            raise
    from eval.checkpoint_shapes import check_params
    from eval.symbol_rewrite import inference_symbol, rewrite_fused_prelu

    with open(f"{prefix}-symbol.json", encoding="utf-8") as f:
        doc = json.load(f)
    rewrite_fused_prelu(doc)
    sym = inference_symbol(mx.sym.load_json(json.dumps(doc)).get_internals()["fc1_output"])
    arg_params, aux_params = _load_params(prefix, epoch)
    data_shape = (batch_size, 3) + tuple(image_size)
    check_params(sym, arg_params, aux_params, {"data": data_shape}, allow_missing=False,
                 what="%s-%04d.params" % (prefix, epoch))
    module = mx.mod.Module(symbol=sym, context=mx.cpu(), label_names=None)
    module.bind(data_shapes=[("data", data_shape)], for_training=False)
    module.set_params(arg_params, aux_params, allow_extra=True)
    return module, "fused_prelu nodes read as LeakyReLU(prelu): the operator library is not loaded in this process"


def _load_params(prefix, epoch):
    from .cli import load_checkpoint_files

    _, arg_params, aux_params = load_checkpoint_files(prefix, epoch)
    return arg_params, aux_params


def relative_difference(a, b):
    """``max |a - b| / max |b|`` (the tolerance is relative to the embedding's scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a - b))) / scale


def random_images(count, image_size, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(0, 255, size=(count, 3) + tuple(image_size)).astype(np.float32)


def check(onnx_path, prefix, epoch, image_size=(112, 112), pack=None, batch_size=8, tolerance=DEFAULT_TOLERANCE,
          random_count=DEFAULT_RANDOM_IMAGES, seed=0, nfolds=10):
    """Compare the ONNX model with the checkpoint; returns a report dict (``passed`` says whether it holds).

    Parameters
    ----------
    onnx_path : the exported model
    prefix, epoch : the checkpoint it was exported from
    image_size : (H, W)
    pack : None, a ``.bin`` path, or a loaded ``(data_list, issame_list)`` (``eval.verification.load_bin``)
    batch_size : MXNet batch (and ONNX batch for dynamic models)
    tolerance : maximum ``max |onnx - mxnet| / max |mxnet|``
    random_count, seed : the random images
    """
    from eval.protocol import evaluate_embeddings

    sess = session(onnx_path)
    module, note = reference_module(prefix, epoch, batch_size, image_size)
    report = {"onnx": onnx_path, "model": f"{prefix},{epoch}", "tolerance": tolerance, "reference_note": note}
    images = random_images(random_count, image_size, seed)
    tic = time.perf_counter()
    ref = mxnet_embed(module, images, batch_size)
    got = onnx_embed(sess, images, batch_size)
    report["random"] = {"images": len(images), "max_rel_diff": relative_difference(got, ref),
                        "max_abs_diff": float(np.max(np.abs(got - ref))), "max_abs_embedding": float(np.max(np.abs(ref)))}
    diffs = [report["random"]["max_rel_diff"]]
    passed = True
    if pack is not None:
        if isinstance(pack, str):
            from eval.verification import load_bin
            what = pack
            pack = load_bin(pack, image_size)
        else:
            what = getattr(pack, "path", None) or "pack"
        data_list, issame = pack[0], pack[1]
        views_mx = [mxnet_embed(module, d, batch_size) for d in data_list]
        views_onnx = [onnx_embed(sess, d, batch_size) for d in data_list]
        diff = max(relative_difference(o, m) for o, m in zip(views_onnx, views_mx))
        res_mx = evaluate_embeddings(views_mx, issame, nfolds=nfolds, what=what)
        res_onnx = evaluate_embeddings(views_onnx, issame, nfolds=nfolds, what=what)
        report["pack"] = {"path": what, "pairs": len(issame), "images": int(data_list[0].shape[0]),
                          "max_rel_diff": diff, "accuracy_mxnet": res_mx.acc2, "std_mxnet": res_mx.std2,
                          "accuracy_onnx": res_onnx.acc2, "std_onnx": res_onnx.std2,
                          "fold_accuracies_equal": bool(np.array_equal(res_mx.accuracy, res_onnx.accuracy))}
        diffs.append(diff)
        passed = report["pack"]["fold_accuracies_equal"]
    report["max_rel_diff"] = max(diffs)
    report["seconds"] = time.perf_counter() - tic
    report["passed"] = bool(passed and report["max_rel_diff"] <= tolerance)
    return report


def format_report(report):
    """Console lines of a :func:`check` report."""
    r = report["random"]
    lines = [f"check {report['onnx']} vs {report['model']}" + (f" ({report['reference_note']})"
                                                               if report.get("reference_note") else "") + ":",
             f"  random images ({r['images']}): max |onnx - mxnet| = {r['max_abs_diff']:.3g} "
             f"(max |embedding| {r['max_abs_embedding']:.3g}; relative {r['max_rel_diff']:.3g})"]
    p = report.get("pack")
    if p:
        lines.append(f"  pack {p['path']} ({p['pairs']} pairs, images + flips): relative {p['max_rel_diff']:.3g}; "
                     f"Accuracy-Flip mxnet {p['accuracy_mxnet']:.5f}+-{p['std_mxnet']:.5f}, onnx "
                     f"{p['accuracy_onnx']:.5f}+-{p['std_onnx']:.5f} (folds equal: {p['fold_accuracies_equal']})")
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"  max relative difference {report['max_rel_diff']:.3g} (tolerance {report['tolerance']:.3g}): "
                 f"{verdict}")
    return lines
