"""The MXNet side of the export: a checkpoint's symbol rewritten into a graph MXNet 1.9's ONNX exporter handles.

``prepare(symbol_json, arg_params, aux_params, image_size)`` returns the symbol cut at ``fc1_output`` and the
parameters the ONNX graph needs, after these rewrites (the JSON surgery is :mod:`eval.symbol_rewrite`; no operator
library and no other project package is needed, so checkpoints written by insightface or by any version of this
project work):

1. ``fused_prelu`` nodes (the optional C++ operator of ``symbols/ops``) -> ``LeakyReLU(act_type='prelu')`` on the
   same (data, gamma) inputs;
2. the fast PReLU subgraphs of ``symbols/common.py`` ``fast_prelu`` (both forms: ``relu(x) +
   Deconvolution(relu(Deconvolution(x, -1)), Reshape(-gamma))`` and the earlier ``relu(x) + reshape_like(Flatten(
   Convolution(reshape(x - relu(x)), Reshape(gamma), kernel=(1,))), x)``) -- recognised by their structure (not by
   names) -> one
   ``LeakyReLU(prelu)`` node with the name of the subgraph's output, so the exporter writes a plain ONNX
   ``PRelu``;
3. ``Dropout`` -> removed (identity at inference);
4. ``Flatten`` inserted before every ``FullyConnected`` that flattens its input (MXNet does this implicitly; the
   exporter emits a ``Gemm`` that needs 2-D input, e.g. after GDC's (B, C, 1, 1) map);
5. ``BatchNorm(fix_gamma=True)`` (insightface's ``fc1``, GNAP's ``bn6f``/``bn6w``): MXNet ignores the stored gamma
   (which weight decay has moved away from 1 in insightface checkpoints) but the exporter writes it; the gamma is
   set to 1 and the attribute to False, so the graph means the same in MXNet and in ONNX.

The result is the inference graph MXNet itself runs (same parameter names and values), which is why
:mod:`eval.export_onnx.check` can compare ONNX Runtime with the original checkpoint directly.
"""
import json
import logging

import mxnet as mx
import numpy as np

from eval.symbol_rewrite import (_TRUE, GraphRewriteError, _attrs, remove_dropout_and_flatten_fc,
                                 rewrite_fast_prelu, rewrite_fused_prelu)

logger = logging.getLogger(__name__)

EMBEDDING_OUTPUT = "fc1_output"


def rewrite_symbol_json(symbol_json):
    """The exportable embedding graph of a checkpoint symbol (JSON text or dict) -> (Symbol, report dict).

    Cuts at ``fc1_output`` (raises :class:`GraphRewriteError` when the symbol has none) and applies the rewrites
    listed in the module docstring (fix_gamma is applied by :func:`prepare` since it touches the parameters).
    """
    doc = json.loads(symbol_json) if isinstance(symbol_json, str) else json.loads(json.dumps(symbol_json))
    fused = rewrite_fused_prelu(doc)
    try:
        sym = mx.sym.load_json(json.dumps(doc))  # also upgrades legacy JSON ("attr"/"param") to the current form
    except mx.base.MXNetError as exc:
        raise GraphRewriteError(f"MXNet cannot load the symbol: {str(exc).splitlines()[0]}") from None
    internals = sym.get_internals()
    if EMBEDDING_OUTPUT not in internals.list_outputs():
        raise GraphRewriteError(f"the symbol has no '{EMBEDDING_OUTPUT}' node (outputs: {sym.list_outputs()}); the "
                                "export needs insightface's embedding layer named fc1")
    doc = json.loads(internals[EMBEDDING_OUTPUT].tojson())
    doc, fast = rewrite_fast_prelu(doc)
    doc, counts = remove_dropout_and_flatten_fc(doc)
    sym = mx.sym.load_json(json.dumps(doc))
    report = {"fused_prelu": fused, "fast_prelu": fast, **counts}
    return sym, report


def fix_gamma_names(sym):
    """Names of the gamma inputs of ``BatchNorm`` nodes with ``fix_gamma`` true (MXNet's default is True)."""
    doc = json.loads(sym.tojson())
    names = []
    for node in doc["nodes"]:
        if node["op"] == "BatchNorm" and str(_attrs(node).get("fix_gamma", "True")).lower() in _TRUE:
            names.append(doc["nodes"][node["inputs"][1][0]]["name"])
    return names


def _unfix_gamma(sym):
    doc = json.loads(sym.tojson())
    for node in doc["nodes"]:
        if node["op"] == "BatchNorm":
            node.setdefault("attrs", {})["fix_gamma"] = "False"
    return mx.sym.load_json(json.dumps(doc))


def prelu_slope_shapes(sym, data_shape):
    """{gamma name: shape ONNX PRelu needs}: (C, 1, ..., 1) so the slope broadcasts over axis 1 of the input."""
    doc = json.loads(sym.tojson())
    internals = sym.get_internals()
    _, out_shapes, _ = internals.infer_shape(data=data_shape)
    shape_of = dict(zip(internals.list_outputs(), out_shapes))
    result = {}
    for node in doc["nodes"]:
        if node["op"] == "LeakyReLU" and _attrs(node).get("act_type") == "prelu":
            src = doc["nodes"][node["inputs"][0][0]]
            idx = node["inputs"][0][1]
            key = src["name"] if src["op"] == "null" else f"{src['name']}_output" + (str(idx) if idx else "")
            in_shape = shape_of.get(key)
            if in_shape is None:  # multi-output producers name their outputs differently; fall back to rank 4
                in_shape = (0, 0, 0, 0)
            gamma = doc["nodes"][node["inputs"][1][0]]["name"]
            channels = None
            if len(in_shape) >= 2:
                channels = in_shape[1]
            result[gamma] = (channels,) + (1,) * max(len(in_shape) - 2, 0)
    return result


def prepare(symbol_json, arg_params, aux_params, image_size, batch=1):
    """Exportable (Symbol, params dict, info) from a checkpoint.

    Parameters
    ----------
    symbol_json : str or dict, the checkpoint's ``-symbol.json`` (full training or embedding-only)
    arg_params, aux_params : dicts of NDArray (``mx.model.load_checkpoint``'s, without ``arg:``/``aux:``)
    image_size : (H, W)
    batch : int, the batch used for shape inference

    Returns
    -------
    sym : Symbol ``data`` -> ``fc1_output`` (rewritten as the module docstring says)
    params : {name: float32 NDArray} exactly the arguments and aux states of ``sym``
    info : dict with the rewrite counts, ``fix_gamma`` (gamma names set to 1), ``prelu_slopes``
        ({gamma: ONNX shape}) and ``output_shape`` (with the batch given).
    """
    from eval.checkpoint_shapes import check_params  # local: one shape check for every checkpoint reader

    sym, report = rewrite_symbol_json(symbol_json)
    data_shape = (batch, 3) + tuple(image_size)
    check_params(sym, arg_params, aux_params, {"data": data_shape}, allow_missing=False)
    fixed = fix_gamma_names(sym)
    params = {}
    for name in sym.list_arguments():
        if name != "data":
            params[name] = arg_params[name].astype(np.float32)
    for name in sym.list_auxiliary_states():
        params[name] = aux_params[name].astype(np.float32)
    for name in fixed:
        params[name] = mx.nd.ones(params[name].shape, dtype=np.float32)
    sym = _unfix_gamma(sym)
    _, out_shapes, _ = sym.infer_shape(data=data_shape)
    info = dict(report, fix_gamma=fixed, prelu_slopes=prelu_slope_shapes(sym, data_shape),
                output_shape=tuple(out_shapes[0]))
    logger.info("export graph: %d fast_prelu + %d fused_prelu subgraph(s) -> PRelu, %d Dropout removed, %d Flatten "
                "added before FullyConnected, fix_gamma BatchNorm gamma set to 1: %s", report["fast_prelu"],
                report["fused_prelu"], report["dropout"], report["flatten"], ", ".join(fixed) or "none")
    return sym, params, info
