"""ONNX export of a checkpoint's embedding, verified against MXNet: ``python -m eval.export_onnx``.

``python -m eval.export_onnx --model prefix,epoch --output model.onnx [--batch dynamic|N] [--opset N] [--check]
[--check-pack lfw.bin]`` writes a model whose input ``data`` is float32 N x 3 x H x W RGB 0..255 (the
``(x - 127.5) * 0.0078125`` normalisation is inside the graph, as in the MXNet model) and whose output ``fc1`` is
the embedding. It accepts full training checkpoints (cut at ``fc1_output``) and embedding-only ones, this project's
and insightface's (``arg:``/``aux:`` params, LeakyReLU or fast or fused PReLU graphs). ``--check`` then runs the
proof of :mod:`eval.export_onnx.check` and exits non-zero when ONNX Runtime's embedding differs from MXNet's by
more than the tolerance.

Sub-modules: :mod:`.graph` (MXNet symbol rewrites, parameters), :mod:`.exporter` (converter call and the fixes of
the ONNX model), :mod:`.check` (ONNX Runtime vs MXNet), :mod:`.cli`. insightface's own route, for comparison:
``deploy/mxnet_to_ort.py`` (PRelu slope reshape, initializers removed from the inputs, batch axis) and, for the
PyTorch models, ``recognition/arcface_torch/torch2onnx.py``.

Needs the optional dependencies ``pip install -e ".[onnx]"`` (onnx<1.15 -- MXNet 1.9's exporter imports
``onnx.mapping`` --, protobuf<4, onnxruntime).
"""
from .check import check, format_report, onnx_embed, relative_difference, session
from .exporter import DEFAULT_OPSET, OnnxExportError, export, parse_batch
from .graph import GraphRewriteError, prepare, rewrite_symbol_json

__all__ = ["export", "check", "format_report", "onnx_embed", "relative_difference", "session", "prepare",
           "rewrite_symbol_json", "parse_batch", "OnnxExportError", "GraphRewriteError", "DEFAULT_OPSET",
           "export_checkpoint"]


def export_checkpoint(prefix, epoch, output, **kwargs):
    """``export`` of the checkpoint ``prefix-symbol.json`` + ``prefix-%04d.params`` (see :func:`.cli.load`)."""
    from .cli import load_checkpoint_files

    symbol_json, arg_params, aux_params = load_checkpoint_files(prefix, epoch)
    kwargs.setdefault("metadata", {"source": f"{prefix},{epoch}"})
    return export(symbol_json, arg_params, aux_params, output, **kwargs)
