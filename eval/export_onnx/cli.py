"""Command line: ``python -m eval.export_onnx --model prefix,epoch --output model.onnx [--check]``.

Exit status: 0 exported (and, with ``--check``, the proof passed); 1 a bad checkpoint, argument or missing
dependency (one-line error); 2 usage; 3 ``--check`` failed (ONNX Runtime's embedding differs from MXNet's by more
than ``--tolerance``, or the pack accuracies differ).
"""
import argparse
import json
import logging
import os
import sys

import mxnet as mx

from iterators.formats.atomic import atomic_write_text
from iterators.formats.images import parse_image_size
from iterators.formats.params import read_params

logger = logging.getLogger(__name__)

EXIT_CHECK_FAILED = 3


def load_checkpoint_files(prefix, epoch):
    """(symbol JSON text, arg_params, aux_params) of a checkpoint; the symbol is read as text, so a symbol using
    the optional ``fused_prelu`` operator needs no library. FileNotFoundError names a missing file."""
    sym_path, params_path = f"{prefix}-symbol.json", "%s-%04d.params" % (prefix, epoch)
    for path in (sym_path, params_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path} (--model prefix,epoch)")
    with open(sym_path, encoding="utf-8") as f:
        symbol_json = f.read()
    arg_params, aux_params = read_params(params_path)
    return symbol_json, arg_params, aux_params


def parse_model(spec):
    prefix, sep, epoch = spec.rpartition(",")
    if not sep or not prefix or not epoch.strip().isdigit():
        raise ValueError(f"--model {spec!r}: expected prefix,epoch (e.g. models/r100/model,1)")
    return prefix, int(epoch)


def build_parser():
    from .check import DEFAULT_TOLERANCE
    from .exporter import DEFAULT_OPSET

    parser = argparse.ArgumentParser(
        prog="python -m eval.export_onnx",
        description="Export the fc1 embedding of an MXNet checkpoint (this project's or insightface's) to ONNX: "
                    "input data N x 3 x H x W RGB 0..255 float32, output fc1.")
    parser.add_argument("--model", required=True, help="prefix,epoch of the checkpoint (training or embedding-only)")
    parser.add_argument("--output", required=True, help="path of the .onnx file")
    parser.add_argument("--batch", default="dynamic", help="'dynamic' (symbolic batch axis N, default) or a fixed N")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= 12; default {DEFAULT_OPSET})")
    parser.add_argument("--image-size", default="112,112", help="H,W of the input (default 112,112)")
    parser.add_argument("--check", action="store_true",
                        help="after export, compare ONNX Runtime with MXNet on random images (and --check-pack)")
    parser.add_argument("--check-pack", default="", help="a .bin verification pack used by --check (images, flips, "
                                                         "Accuracy-Flip of both)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="--check fails when max|onnx - mxnet| / max|mxnet| exceeds this (default %(default)g)")
    parser.add_argument("--batch-size", type=int, default=8, help="MXNet batch used by --check")
    parser.add_argument("--json", default="", help="write the export info (and the check report) to this JSON file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_pack and not args.check:
        parser.error("--check-pack needs --check")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .exporter import OnnxExportError
    from .graph import GraphRewriteError

    try:
        return _run(args)
    except (FileNotFoundError, ValueError, OnnxExportError, GraphRewriteError, mx.base.MXNetError) as exc:
        print(f"eval.export_onnx: error: {exc}", file=sys.stderr)
        return 1


def _run(args):
    from .check import check, format_report
    from .exporter import export, parse_batch

    prefix, epoch = parse_model(args.model)
    batch = parse_batch(args.batch)
    image_size = parse_image_size(args.image_size)
    symbol_json, arg_params, aux_params = load_checkpoint_files(prefix, epoch)
    info = export(symbol_json, arg_params, aux_params, args.output, image_size=image_size, batch=batch,
                  opset=args.opset, metadata={"source": f"{os.path.basename(prefix)},{epoch}"})
    print(f"exported {prefix},{epoch} -> {args.output}: {info['bytes'] / 1e6:.1f} MB in {info['seconds']:.1f} s, "
          f"input data {info['input_shape']}, output {info['output_name']} {['N' if batch is None else batch] + list(info['output_shape'][1:])}, "
          f"opset {info['opset']}")
    print(f"  rewrites: {info['fast_prelu'] + info['fused_prelu']} PReLU subgraph(s) -> PRelu, "
          f"{info['prelu_slopes_reshaped']} slope(s) reshaped to [C,1,1], {info['flatten']} Flatten before "
          f"FullyConnected, {info['dropout']} Dropout removed, fix_gamma gamma=1: {', '.join(info['fix_gamma']) or 'none'}")
    payload = {"export": {k: v for k, v in info.items() if k != "prelu_slopes"}}
    status = 0
    if args.check:
        report = check(args.output, prefix, epoch, image_size=image_size, pack=args.check_pack or None,
                                 batch_size=args.batch_size, tolerance=args.tolerance)
        for line in format_report(report):
            print(line)
        payload["check"] = report
        status = 0 if report["passed"] else EXIT_CHECK_FAILED
    if args.json:
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str) + "\n")
    return status
