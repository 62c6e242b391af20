"""The ONNX side of the export: MXNet 1.9's converter on the prepared graph, then the fixes its output needs.

MXNet 1.9.1's ``mx.onnx.export_model`` ignores any opset request (it always uses the newest opset of the
installed onnx package) and writes graphs ONNX Runtime rejects or runs wrongly for insightface's networks. We call
its converter (``MXNetGraph.create_onnx_graph_proto``) with the chosen opset and then, as insightface's own
``deploy/mxnet_to_ort.py`` does:

- PReLU slopes: written with shape [C]; ONNX ``PRelu`` broadcasts the slope numpy-style against (N, C, H, W), so
  it must be [C, 1, 1]. Reshaped in the initializer and in the graph input of the same name;
- initializers listed as graph inputs are removed (the model's only input is ``data``; ONNX Runtime can then
  constant-fold and fuse BatchNorm into the convolutions);
- the batch axis: ``N`` (symbolic) for ``--batch dynamic``, else the given number, on input and output; the
  output shape is written in full ((N, D) for the embedding);
- the model declares the requested opset and the lowest IR version that carries it (older runtimes load it).

The graph-side rewrites (PReLU patterns, Flatten before FullyConnected, Dropout, fix_gamma) are in
:mod:`eval.export_onnx.graph`.
"""
import contextlib
import logging
import time

import numpy as np

from iterators.formats.atomic import atomic_write_bytes

from .graph import prepare

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 13
MIN_OPSET = 12  # MXNet 1.9.1's translations exist for opsets 12 and 13
DYNAMIC = "dynamic"
BATCH_DIM = "N"
INPUT_NAME = "data"


class OnnxExportError(RuntimeError):
    """The export failed or the optional ONNX dependencies are missing (message says which and how to fix)."""


def require_onnx():
    """Import and return ``onnx``; OnnxExportError with the install command when it is missing or too new."""
    try:
        import onnx
        from onnx import mapping  # noqa: F401  (removed in onnx 1.15; MXNet 1.9's exporter imports it)
    except ImportError as exc:
        raise OnnxExportError(f"ONNX export needs onnx<1.15 and protobuf<4 ({exc}); install them with "
                              "pip install -e \".[onnx]\"") from None
    return onnx


def parse_batch(text):
    """``dynamic`` -> None; a positive integer -> that int."""
    if text is None or str(text).lower() == DYNAMIC:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--batch {text!r}: expected 'dynamic' or a positive integer") from None
    if value < 1:
        raise ValueError(f"--batch {text!r}: expected 'dynamic' or a positive integer")
    return value


@contextlib.contextmanager
def _raw_initializers():
    """Make MXNet's converter store weights as ``raw_data`` bytes instead of ``float_data`` lists.

    Its ``null`` translation (``convert_weights_and_inputs``) calls ``onnx.helper.make_tensor(vals=arr.tolist())``;
    with protobuf<4 on Python 3.11 (pure-Python protobuf: no C++ wheel exists) building, copying and serialising
    those repeated fields costs minutes for r50 (43M floats went through ``CheckValue`` one by one). Same tensors,
    same file semantics; the translation is swapped for the duration of the export and restored.
    """
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
    from onnx import helper, numpy_helper

    def weights(node, kwargs):
        name = node["name"]
        array = np.ascontiguousarray(kwargs["weights"][name])
        kwargs["initializer"].append(numpy_helper.from_array(array, name))
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        return [helper.make_tensor_value_info(name, elem, array.shape)], (array.dtype,)

    def wrap(original):  # graph inputs (``data``) still go through MXNet's own translation
        return lambda node, **kwargs: weights(node, kwargs) if kwargs["is_input"] is False else original(node, **kwargs)

    saved = {version: table["null"] for version, table in MXNetGraph.registry_.items() if "null" in table}
    for version, original in saved.items():
        MXNetGraph.registry_[version]["null"] = wrap(original)
    try:
        yield
    finally:
        for version, fn in saved.items():
            MXNetGraph.registry_[version]["null"] = fn


def _set_dims(value_info, dims):
    tensor_shape = value_info.type.tensor_type.shape
    del tensor_shape.dim[:]
    for d in dims:
        dim = tensor_shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def fix_model(model, slope_shapes, output_shape, batch):
    """Apply the fixes of the module docstring to an ``onnx.ModelProto`` in place; returns a report dict."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name: i for i in graph.input}
    fixed_slopes = []
    for node in graph.node:
        if node.op_type != "PRelu":
            continue
        slope = node.input[1]
        shape = slope_shapes.get(slope)
        if slope not in inits or shape is None or shape[0] is None:
            raise OnnxExportError(f"PRelu node {node.name!r}: slope {slope!r} is not a known initializer")
        array = numpy_helper.to_array(inits[slope]).astype(np.float32)
        if array.size != shape[0]:
            raise OnnxExportError(f"PRelu node {node.name!r}: slope {slope!r} has {array.size} values, the input has "
                                  f"{shape[0]} channels")
        if tuple(array.shape) != tuple(shape):
            inits[slope].CopyFrom(numpy_helper.from_array(array.reshape(shape), slope))
            fixed_slopes.append(slope)
        if slope in inputs:
            _set_dims(inputs[slope], shape)
    kept = [i for i in graph.input if i.name not in inits]
    removed = len(graph.input) - len(kept)
    del graph.input[:]
    graph.input.extend(kept)
    if [i.name for i in graph.input] != [INPUT_NAME]:
        raise OnnxExportError(f"exported graph inputs are {[i.name for i in graph.input]}, expected ['{INPUT_NAME}']")
    batch_dim = BATCH_DIM if batch is None else batch
    in_dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    _set_dims(graph.input[0], [batch_dim] + in_dims[1:])
    if len(graph.output) != 1:
        raise OnnxExportError(f"exported graph has {len(graph.output)} outputs, expected 1 (fc1)")
    _set_dims(graph.output[0], [batch_dim] + list(output_shape[1:]))
    return {"prelu_slopes_reshaped": len(fixed_slopes), "initializer_inputs_removed": removed}


def export(symbol_json, arg_params, aux_params, output, image_size=(112, 112), batch=None, opset=DEFAULT_OPSET,
           metadata=None):
    """Export the embedding of a checkpoint to ONNX; returns an info dict (timings, size, rewrites, fixes).

    Parameters
    ----------
    symbol_json : str or dict, the checkpoint's symbol (full training or embedding-only; any PReLU form)
    arg_params, aux_params : dicts (``mx.model.load_checkpoint``'s)
    output : path of the ``.onnx`` file (written atomically)
    image_size : (H, W) of the input
    batch : None (dynamic batch axis ``N``) or a fixed batch size
    opset : ONNX opset (>= 12)
    metadata : dict of str -> str stored in the model's ``metadata_props``
    """
    onnx = require_onnx()
    from onnx import helper
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= newest:
        raise ValueError(f"--opset {opset}: MXNet 1.9's exporter supports opsets {MIN_OPSET}..{newest} with "
                         f"onnx {onnx.__version__}")
    tic, cpu = time.perf_counter(), time.process_time()
    sym, params, info = prepare(symbol_json, arg_params, aux_params, image_size, batch=batch or 1)
    in_shape = (batch or 1, 3) + tuple(image_size)
    dynamic = batch is None
    tensor_type = onnx.mapping.NP_TYPE_TO_TENSOR_TYPE[np.dtype(np.float32)]
    try:
        with _raw_initializers():
            graph = MXNetGraph().create_onnx_graph_proto(
                sym, params, [in_shape], [tensor_type], opset_version=int(opset), dynamic=dynamic,
                dynamic_input_shapes=[(BATCH_DIM,) + in_shape[1:]] if dynamic else None)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare AttributeError/KeyError/...
        raise OnnxExportError(f"MXNet's ONNX converter failed: {type(exc).__name__}: {exc}") from exc
    opsets = [helper.make_opsetid("", int(opset))]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="insightface-mx",
                              producer_version="mxnet-" + __import__("mxnet").__version__)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    fixes = fix_model(model, info["prelu_slopes"], info["output_shape"], batch)
    meta = {"input": "data: float32 N x 3 x H x W, RGB 0..255 (normalised inside: (x - 127.5) * 0.0078125)",
            "output": "fc1: the embedding (not L2-normalised)",
            "image_size": f"{image_size[0]},{image_size[1]}"}
    meta.update(metadata or {})
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = str(key), str(value)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"the exported model is not valid ONNX: {exc}") from exc
    data = model.SerializeToString()
    atomic_write_bytes(output, data)
    seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu
    info = dict(info, **fixes, output=output, bytes=len(data), seconds=seconds, cpu_seconds=cpu_seconds, opset=int(opset),
                ir_version=model.ir_version, batch=DYNAMIC if dynamic else batch,
                input_shape=[BATCH_DIM if dynamic else batch, 3] + list(image_size),
                output_name=model.graph.output[0].name)
    logger.info("wrote %s (%.1f MB, opset %d, batch %s) in %.1f s", output, len(data) / 1e6, int(opset),
                info["batch"], seconds)
    return info
