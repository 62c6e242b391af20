"""Bring an ONNX face-embedding model back into an MXNet checkpoint, parameter by parameter.

The target is an MXNet symbol whose parameters are named as insightface's (``conv_1_conv2d_weight``,
``conv_1_batchnorm_gamma``, ``conv_1_relu_gamma``, ``pre_fc1_weight``, ``fc1_moving_var``, ...), e.g. a network of
the registry built with ``symbols.get_embedding``. Models exported from MXNet (``mx.onnx.export_model``, as
insightface's ONNX files and OpenCV Zoo's SFace were) keep those names on their initializers, so the import is
by name:

1. constants are folded: initializers, ``Constant`` nodes, ``DequantizeLinear`` (per-tensor, per-axis and
   opset-21 blocked: ``y = (q - zero_point) * scale`` with scale/zero point repeated ``block_size`` times along
   ``axis``), ``Reshape``/``Identity``/``Cast``/``Squeeze``/``Unsqueeze`` of constants (a quantised model is thus
   read as the fp32 model its int8 weights stand for);
2. every constant input of a ``Conv``, ``BatchNormalization``, ``PRelu`` or ``Gemm`` node is a parameter, named
   after its tensor (quantisation suffixes ``_quantized``/``_dequantized``/``_reshaped`` stripped) or, when that
   name is not one of the symbol's, after the node (``<node output>_weight``/``_bias``/``_gamma``/``_beta``/
   ``_moving_mean``/``_moving_var``), which is how MXNet's exporter names them;
3. each parameter must be one the symbol has, with the symbol's shape (a ``Gemm`` with ``transB=0`` is
   transposed; PReLU slopes ``(C, 1, 1)`` become MXNet's ``(C,)``); the symbol's parameters must all be found;
   the layer settings that change the numbers must agree (``BatchNormalization`` epsilon, a frozen-scale
   ``fix_gamma`` BatchNorm whose ONNX scale is not 1, ``Conv`` kernel/stride/pad/group/dilation, the input
   scalars ``- 127.5`` and ``* 0.0078125``). Every disagreement is listed in one :class:`OnnxImportError`.

The checkpoint is written as ``mx.model.save_checkpoint`` writes it (``prefix-symbol.json``,
``prefix-%04d.params`` with ``arg:``/``aux:`` keys), atomically. ``onnxruntime_session`` runs the ONNX model with
onnxruntime for comparisons (it drops graph inputs that no node reads and initializers listed as inputs, which
old MXNet exports carry and onnxruntime then wants fed).

CLI (the symbol of a registered network: ``python -m recognition.import_onnx --network ...``)::

    python -m eval.import_onnx --onnx model.onnx --symbol net-symbol.json --prefix out/model [--epoch 0] [--check]

``onnx`` (and ``onnxruntime`` for ``--check``) come with the ``[onnx]`` extra.
"""
import argparse
import json
import logging
import sys

import mxnet as mx
import numpy as np

from iterators.formats.atomic import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["OnnxImportError", "fold_constants", "onnx_parameters", "import_onnx", "import_params",
           "onnxruntime_session", "compare_with_onnxruntime", "main"]

#: Parameter roles of each ONNX op's inputs (index -> MXNet suffix); input 0 is the data.
ROLES = {
    "Conv": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "gamma", 2: "beta", 3: "moving_mean", 4: "moving_var"},
    "PRelu": {1: "gamma"},
    "Gemm": {1: "weight", 2: "bias"},
}
#: Suffixes that quantisation tools append to a parameter's tensor name.
QUANT_SUFFIXES = ("_reshaped", "_dequantized", "_quantized")
#: Input normalisation insightface's networks do in the graph: (data - 127.5) * 0.0078125.
INPUT_SCALARS = {"sub": 127.5, "mul": 0.0078125}


class OnnxImportError(ValueError):
    """The ONNX model does not fit the target symbol (the message lists every mismatch)."""


def _require_onnx():
    try:
        import onnx  # noqa: F401
        from onnx import numpy_helper  # noqa: F401
    except ImportError as exc:
        raise OnnxImportError(f"the onnx package is needed ({exc}); install the [onnx] extra: "
                              "pip install -e '.[onnx]'") from None
    return onnx


def _load_model(model):
    onnx = _require_onnx()
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return onnx.load(model)
    return model


def _attrs(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequantize(q, scale, zero_point, axis=1, block_size=0):
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale``, per tensor, per axis or in blocks along ``axis``."""
    q = q.astype(np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point).astype(np.float32)
    if scale.size == 1 and scale.ndim <= 1:
        return (q - zp.reshape(())) * scale.reshape(())
    axis = axis % q.ndim
    if scale.ndim == 1 and not block_size:  # per-axis
        shape = [1] * q.ndim
        shape[axis] = -1
        return (q - zp.reshape(shape)) * scale.reshape(shape)
    if not block_size:
        raise OnnxImportError(f"DequantizeLinear: scale of shape {scale.shape} for data {q.shape} without block_size")
    scale = np.repeat(scale, block_size, axis=axis)
    zp = np.repeat(zp, block_size, axis=axis)
    index = [slice(None)] * q.ndim
    index[axis] = slice(0, q.shape[axis])
    return (q - zp[tuple(index)]) * scale[tuple(index)]


def fold_constants(model):
    """``{tensor name: numpy array}`` of every value computable without the graph inputs (see module doc)."""
    from onnx import numpy_helper
    model = _load_model(model)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        attrs = _attrs(node)
        inputs = [values.get(name) if name else None for name in node.input]
        known = all(v is not None for name, v in zip(node.input, inputs) if name)
        if node.op_type == "Constant" and "value" in attrs:
            values[node.output[0]] = numpy_helper.to_array(attrs["value"])
        elif not known or not node.input:
            continue
        elif node.op_type == "DequantizeLinear":
            values[node.output[0]] = _dequantize(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None,
                                                 attrs.get("axis", 1), attrs.get("block_size", 0))
        elif node.op_type == "Reshape":
            shape = [int(s) for s in inputs[1]]
            shape = [inputs[0].shape[i] if s == 0 and not attrs.get("allowzero", 0) else s
                     for i, s in enumerate(shape)]
            values[node.output[0]] = inputs[0].reshape(shape)
        elif node.op_type == "Identity":
            values[node.output[0]] = inputs[0]
        elif node.op_type == "Cast":
            from onnx import helper
            values[node.output[0]] = inputs[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        elif node.op_type in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes", None)
            if axes is None and len(inputs) > 1:
                axes = [int(a) for a in inputs[1]]
            fn = np.squeeze if node.op_type == "Squeeze" else np.expand_dims
            values[node.output[0]] = fn(inputs[0], tuple(axes)) if axes is not None else np.squeeze(inputs[0])
    return values


def _strip(name):
    changed = True
    while changed:
        changed = False
        for suffix in QUANT_SUFFIXES:
            if name.endswith(suffix):
                name, changed = name[:-len(suffix)], True
    return name


def onnx_parameters(model, known_names=()):
    """The layer parameters of an ONNX graph: ``[(mxnet name, array, node, role)]`` in graph order.

    ``known_names``: the target symbol's parameter names, used to choose between the tensor's own name and the
    node-derived one (module doc, step 2). Gemm weights are returned as (out, in) (``transB=0`` transposed).
    """
    model = _load_model(model)
    values = fold_constants(model)
    known = set(known_names)
    params = []
    for node in model.graph.node:
        roles = ROLES.get(node.op_type)
        if not roles:
            continue
        attrs = _attrs(node)
        for index, role in roles.items():
            if index >= len(node.input) or not node.input[index] or node.input[index] not in values:
                continue
            array = np.asarray(values[node.input[index]], dtype=np.float32)
            own = _strip(node.input[index])
            derived = f"{node.output[0]}_{role}"
            name = own if (own in known or derived not in known) else derived
            if node.op_type == "Gemm" and role == "weight" and not attrs.get("transB", 0):
                array = array.T
            if node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or
                                           (role == "bias" and attrs.get("beta", 1.0) != 1.0)):
                array = array * (attrs.get("alpha", 1.0) if role == "weight" else attrs.get("beta", 1.0))
            params.append((name, array, node, role))
    return params


def _symbol_layers(symbol):
    """``{layer name: (op, attrs)}`` of the symbol's BatchNorm/Convolution/scalar nodes."""
    graph = json.loads(symbol.tojson())
    return {n["name"]: (n["op"], n.get("attrs", {})) for n in graph["nodes"] if n["op"] != "null"}


def _tuple(text, default):
    if text is None:
        return tuple(default)
    return tuple(int(v) for v in str(text).strip("()[] ").split(",") if v.strip())


def _check_layers(model, symbol, params, problems):
    layers = _symbol_layers(symbol)
    by_layer = {}
    for name, array, node, role in params:
        by_layer.setdefault(node.output[0], (node, {}))[1][role] = array
    for out, (node, arrays) in by_layer.items():
        op, attrs = layers.get(out, (None, {}))
        onnx_attrs = _attrs(node)
        if node.op_type == "BatchNormalization" and op == "BatchNorm":
            eps = float(attrs.get("eps", 1e-3))
            onnx_eps = float(onnx_attrs.get("epsilon", 1e-5))
            if not np.isclose(eps, onnx_eps, rtol=1e-3, atol=0):
                problems.append(f"{out}: BatchNorm eps {eps:g} in the symbol, {onnx_eps:g} in the ONNX model")
            fix_gamma = str(attrs.get("fix_gamma", "True")).lower() in ("true", "1")
            gamma = arrays.get("gamma")
            if fix_gamma and gamma is not None and np.abs(gamma - 1.0).max() > 1e-3:
                problems.append(f"{out}: the symbol's BatchNorm has fix_gamma=True (scale 1) but the ONNX scale "
                                f"is not 1 (max |gamma - 1| = {np.abs(gamma - 1.0).max():.3g}); build the network "
                                "with a learned-scale BatchNorm here")
        elif node.op_type == "Conv" and op == "Convolution":
            kernel = _tuple(attrs.get("kernel"), ())
            mx_conv = {"kernel_shape": kernel, "strides": _tuple(attrs.get("stride"), (1,) * len(kernel)),
                       "pads": _tuple(attrs.get("pad"), (0,) * len(kernel)) * 2,
                       "group": int(attrs.get("num_group", 1)),
                       "dilations": _tuple(attrs.get("dilate"), (1,) * len(kernel))}
            weight = arrays.get("weight")
            onnx_conv = {"kernel_shape": tuple(onnx_attrs.get("kernel_shape", weight.shape[2:] if weight is not None
                                                              else ())),
                         "strides": tuple(onnx_attrs.get("strides", (1,) * len(kernel))),
                         "pads": tuple(onnx_attrs.get("pads", (0,) * 2 * len(kernel))),
                         "group": int(onnx_attrs.get("group", 1)),
                         "dilations": tuple(onnx_attrs.get("dilations", (1,) * len(kernel)))}
            diff = {k: (mx_conv[k], onnx_conv[k]) for k in mx_conv if tuple(np.atleast_1d(mx_conv[k])) !=
                    tuple(np.atleast_1d(onnx_conv[k]))}
            if diff:
                problems.append(f"{out}: Convolution settings differ (symbol, ONNX): {diff}")
        elif node.op_type in ("BatchNormalization", "Conv") and op is None:
            pass  # reported by name below if its parameters do not fit
    # input normalisation scalars
    values = fold_constants(model)
    onnx_scalars = {"sub": [], "mul": []}
    for node in model.graph.node:
        key = {"Sub": "sub", "Mul": "mul"}.get(node.op_type)
        if key and len(node.input) == 2 and node.input[1] in values and np.size(values[node.input[1]]) == 1:
            onnx_scalars[key].append(float(np.ravel(values[node.input[1]])[0]))
    mx_scalars = {"sub": [float(a["scalar"]) for op, a in layers.values() if op == "_minus_scalar"],
                  "mul": [float(a["scalar"]) for op, a in layers.values() if op == "_mul_scalar"]}
    for key in ("sub", "mul"):
        if sorted(onnx_scalars[key]) != _matched_sorted(mx_scalars[key], onnx_scalars[key]):
            problems.append(f"input scalars differ: the ONNX model {key}s {onnx_scalars[key]}, the symbol "
                            f"{mx_scalars[key]} (insightface networks compute (data - 127.5) * 0.0078125)")


def _matched_sorted(expected, actual):
    """``sorted(expected)``, with each value replaced by the matching ``actual`` one when they agree to 1e-6."""
    out = []
    for e in sorted(expected):
        match = [a for a in actual if np.isclose(a, e, rtol=1e-6, atol=0)]
        out.append(match[0] if match else e)
    return sorted(out)


def import_params(model, symbol, data_shape=None):
    """Map the ONNX model's parameters onto ``symbol``: returns ``(arg_params, aux_params)`` of NDArrays.

    ``data_shape``: the ``data`` input shape used to infer the symbol's shapes (default: the ONNX model's first
    input with batch 1). Raises :class:`OnnxImportError` listing every name, shape or setting that does not fit.
    """
    model = _load_model(model)
    if data_shape is None:
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        data_shape = (1,) + tuple(dims[1:])
    arg_shapes, _, aux_shapes = symbol.infer_shape(data=tuple(data_shape))
    if arg_shapes is None:
        raise OnnxImportError(f"cannot infer the symbol's shapes for data {tuple(data_shape)}")
    wanted = {n: tuple(s) for n, s in zip(symbol.list_arguments(), arg_shapes) if n != "data"}
    wanted_aux = {n: tuple(s) for n, s in zip(symbol.list_auxiliary_states(), aux_shapes)}
    shapes = {**wanted, **wanted_aux}
    labels = [n for n in wanted if n.endswith("_label")]
    for n in labels:
        del shapes[n]
    params = onnx_parameters(model, shapes)
    problems, found, seen = [], {}, set()
    for name, array, node, role in params:
        seen.add(name)
        if name not in shapes:
            problems.append(f"ONNX parameter {name!r} ({node.op_type} {node.output[0]!r} {role}, shape "
                            f"{array.shape}) is not a parameter of the symbol")
            continue
        want = shapes[name]
        if array.shape != want:
            if array.size == int(np.prod(want)) and [d for d in array.shape if d != 1] == [d for d in want if d != 1]:
                array = array.reshape(want)  # e.g. PReLU slopes (C, 1, 1) -> (C,)
            else:
                problems.append(f"{name}: shape {array.shape} in the ONNX model, {want} in the symbol")
                continue
        if name in found:
            problems.append(f"{name}: given twice in the ONNX model")
        found[name] = array
    missing = [n for n in shapes if n not in seen]
    if missing:
        problems.append(f"the symbol's parameter(s) {missing} are not in the ONNX model")
    _check_layers(model, symbol, params, problems)
    if problems:
        raise OnnxImportError("the ONNX model does not fit the symbol:\n  " + "\n  ".join(problems))
    arg_params = {n: mx.nd.array(found[n]) for n in wanted if n in found}
    aux_params = {n: mx.nd.array(found[n]) for n in wanted_aux}
    return arg_params, aux_params


def import_onnx(model, symbol, prefix, epoch=0, data_shape=None):
    """Write ``prefix-symbol.json`` + ``prefix-%04d.params`` for ``symbol`` with the ONNX model's weights.

    ``symbol``: an ``mx.sym.Symbol`` or the path of a ``-symbol.json``. Returns ``(arg_params, aux_params)``.
    """
    if isinstance(symbol, str):
        symbol = mx.sym.load(symbol)
    arg_params, aux_params = import_params(model, symbol, data_shape)
    save = {f"arg:{k}": v for k, v in arg_params.items()}
    save.update({f"aux:{k}": v for k, v in aux_params.items()})
    atomic_write_text(f"{prefix}-symbol.json", symbol.tojson())
    atomic_write("%s-%04d.params" % (prefix, epoch), lambda tmp: mx.nd.save(tmp, save))
    logger.info("imported %d parameters into %s-%04d.params", len(save), prefix, epoch)
    return arg_params, aux_params


def onnxruntime_session(model):
    """``onnxruntime.InferenceSession`` on the model, with the graph inputs that are initializers or that no node
    reads removed (old MXNet exports list every weight as an input)."""
    import onnxruntime as ort
    model = _load_model(model)
    used = {name for node in model.graph.node for name in node.input}
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name in used and i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare_with_onnxruntime(model, prefix, epoch=0, num=4, seed=0, data_shape=(3, 112, 112)):
    """Max relative difference between onnxruntime's outputs and the checkpoint's ``fc1_output`` on random
    RGB 0..255 inputs (one image per forward, as the ONNX input is batch 1)."""
    session = onnxruntime_session(model)
    sym, arg_params, aux_params = mx.model.load_checkpoint(prefix, epoch)
    mod = mx.mod.Module(sym.get_internals()["fc1_output"], context=mx.cpu(), label_names=None)
    mod.bind(data_shapes=[("data", (1,) + tuple(data_shape))], for_training=False)
    mod.set_params(arg_params, aux_params, allow_extra=True)
    images = np.random.RandomState(seed).uniform(0, 255, (num, 1) + tuple(data_shape)).astype(np.float32)
    name = session.get_inputs()[0].name
    worst = 0.0
    for image in images:
        ref = session.run(None, {name: image})[0]
        mod.forward(mx.io.DataBatch([mx.nd.array(image)]), is_train=False)
        out = mod.get_outputs()[0].asnumpy()
        worst = max(worst, float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return worst


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m eval.import_onnx", description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", required=True, help="ONNX model (insightface parameter names)")
    parser.add_argument("--symbol", required=True, help="target MXNet symbol (a -symbol.json)")
    parser.add_argument("--prefix", required=True, help="checkpoint prefix to write")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with onnxruntime on random inputs")
    return parser


def run(onnx_path, symbol, prefix, epoch=0, check=False):
    """Import and optionally compare; prints what it did. Returns the relative difference (or None)."""
    import_onnx(onnx_path, symbol, prefix, epoch)
    print("checkpoint", "%s-%04d.params" % (prefix, epoch), f"{prefix}-symbol.json")
    if check:
        diff = compare_with_onnxruntime(onnx_path, prefix, epoch)
        print(f"onnxruntime vs MXNet fc1_output: max relative difference {diff:.3g}")
        return diff
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args.onnx, args.symbol, args.prefix, args.epoch, args.check)
    except (OnnxImportError, FileNotFoundError) as exc:
        print(f"eval.import_onnx: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
