"""Fused PReLU operator (symbols/ops) vs fast_prelu graph vs ReLU: per-layer fwd+bwd and whole-net training.

Per layer: forward + backward (dx and dgamma) of the activation alone at the activation shapes of r18 and y1
(batch 32, 112x112 input): ``relu`` (Activation), ``fast_prelu`` (symbols/common.py), ``fused`` (the C++ op) and
insightface's ``LeakyReLU(prelu)`` (symbol/fresnet.py ``Act``).

Whole net: training step throughput (forward + backward + SGD update, ArcFace head, 1000 classes, batch 32,
synthetic input; benchmarks/common.py ``measure_train_throughput``) of the same network with ``relu``,
``fast_prelu`` and ``fused`` activations. The fused net is ``symbols.ops.fuse_symbol`` of the fast_prelu net
(same parameters, every PReLU one ``fused_prelu`` node), so nothing under symbols/ needs to change to measure it.
Formulations are interleaved per repetition (a change of machine load hits all alike); the best repetition is
reported, with the 1-minute load average sampled before every measurement.

    python -m benchmarks.bench_fused_prelu                 # per-layer + r18_x0.25, y1, r18 (full width)
    python -m benchmarks.bench_fused_prelu --quick         # per-layer + r18_x0.25 and y1 only
    python -m benchmarks.bench_fused_prelu --mxnet-default-threads --name fused_prelu_1thread

Threads: like the training entry points, ``eval.runtime.configure_threads`` (all usable cores) unless
``--mxnet-default-threads``.
"""
import argparse
import logging
import os
import time

import mxnet as mx
import numpy as np

import symbols
from benchmarks.common import measure_train_throughput, write_json
from eval.runtime import configure_threads
from symbols import ops
from symbols.common import fast_prelu

logger = logging.getLogger(__name__)

BATCH = 32
NUM_CLASSES = 1000
# (label, network, net_multiplier, timed steps, repetitions)
NET_CASES = [
    ("r18_x0.25", "r18", 0.25, 4, 3),
    ("y1", "y1", 1.0, 3, 3),
    ("r18", "r18", 1.0, 2, 2),
]
QUICK_NETS = ("r18_x0.25", "y1")
# (label, shape): activation shapes of r18 (fresnet, 112x112 input, net_input=1) and y1 (fmobilefacenet)
LAYER_CASES = [
    ("r18 relu0 / stage1", (BATCH, 64, 112, 112)),
    ("r18 stage1 / y1 conv_1", (BATCH, 64, 56, 56)),
    ("r18 stage2 / y1 dconv_23", (BATCH, 128, 28, 28)),
    ("r18 stage3 / y1 conv_3x", (BATCH, 256, 14, 14)),
    ("r18 stage4 / y1 conv_4x", (BATCH, 512, 7, 7)),
    ("y1 conv_6sep", (BATCH, 512, 7, 7)),
    ("2-D (B, 512)", (BATCH, 512)),
]
LAYER_KINDS = ("relu", "fast_prelu", "fused", "leakyrelu_prelu")


def layer_symbol(kind, channels, ndim):
    data = mx.sym.Variable("data")
    gamma = mx.sym.Variable("act_gamma", shape=(channels,))
    if kind == "relu":
        return mx.sym.Activation(data, act_type="relu", name="act")
    if kind == "fast_prelu":
        return fast_prelu(data, gamma, "act", channels, ndim=ndim)
    if kind == "fused":
        return ops.prelu_op(data, gamma, "act", channels)
    return mx.sym.LeakyReLU(data=data, gamma=gamma, act_type="prelu", name="act")


def time_layer(kind, shape, steps):
    """Seconds per forward+backward of the activation alone (best of ``steps`` after one warm-up)."""
    sym = layer_symbol(kind, shape[1], len(shape))
    rng = np.random.RandomState(0)
    args = {"data": mx.nd.array(rng.randn(*shape).astype(np.float32))}
    if "act_gamma" in sym.list_arguments():
        args["act_gamma"] = mx.nd.array(np.full(shape[1], 0.25, np.float32))
    grads = {k: mx.nd.zeros(v.shape) for k, v in args.items()}
    ex = sym.bind(mx.cpu(), args, args_grad=grads)
    head = mx.nd.array(rng.randn(*shape).astype(np.float32))
    best = float("inf")
    for i in range(steps + 1):
        mx.nd.waitall()
        start = time.perf_counter()
        ex.forward(is_train=True)
        ex.backward(head)
        mx.nd.waitall()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def run_layers(steps, repeats):
    results = []
    for label, shape in LAYER_CASES:
        best = {}
        for _ in range(repeats):
            for kind in LAYER_KINDS:
                if kind == "leakyrelu_prelu" and np.prod(shape) > 32 * 64 * 56 * 56:
                    continue  # very slow at the largest shape; the other shapes show it
                best[kind] = min(best.get(kind, float("inf")), time_layer(kind, shape, steps))
        row = {"layer": label, "shape": list(shape), "ms_fwd_bwd": {k: v * 1e3 for k, v in best.items()},
               "fused_vs_relu_time": best["fused"] / best["relu"],
               "fast_prelu_vs_relu_time": best["fast_prelu"] / best["relu"],
               "loadavg_1": os.getloadavg()[0]}
        results.append(row)
        print(f"{label:28s} {str(shape):22s} " + "  ".join(f"{k}={v * 1e3:7.2f}ms" for k, v in best.items())
              + f"  fused/relu={row['fused_vs_relu_time']:.2f}x time", flush=True)
    return results


def build_net(network, multiplier, kind):
    config = {"network": network, "net_multiplier": multiplier, "num_classes": NUM_CLASSES, "per_batch_size": BATCH,
              "loss": "arcface", "net_act": "relu" if kind == "relu" else "prelu", "fast_prelu": True}
    sym = symbols.get_symbol(config)
    if kind == "fused":
        sym = ops.fuse_symbol(sym)
        assert ops.uses_fused_op(sym)
    return sym


def run_net(label, network, multiplier, steps, repeats):
    best, loads = {}, []
    for rep in range(repeats):
        for kind in ("relu", "fast_prelu", "fused"):
            loads.append(os.getloadavg()[0])
            before = ops.call_counts()["forward"]
            result = measure_train_throughput(build_net(network, multiplier, kind), (BATCH, 3, 112, 112),
                                              steps=steps, warmup=1)
            if kind == "fused":
                assert ops.call_counts()["forward"] > before, "fused net ran without calling the operator"
            logger.info("%s %s rep %d: %.2f samples/s (load %.2f)", label, kind, rep, result["samples_per_sec"],
                        loads[-1])
            if kind not in best or result["samples_per_sec"] > best[kind]["samples_per_sec"]:
                best[kind] = result
    speeds = {k: r["samples_per_sec"] for k, r in best.items()}
    return {
        "network": network, "net_multiplier": multiplier, "batch_size": BATCH, "steps": steps, "repeats": repeats,
        "samples_per_sec": speeds, "sec_per_step": {k: r["sec_per_step"] for k, r in best.items()},
        "fused_vs_relu": speeds["fused"] / speeds["relu"],
        "fast_prelu_vs_relu": speeds["fast_prelu"] / speeds["relu"],
        "fused_over_fast_prelu": speeds["fused"] / speeds["fast_prelu"],
        "loadavg_1_during": [round(v, 2) for v in loads],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only quarter-width r18 and y1 whole nets")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer timings")
    parser.add_argument("--no-nets", action="store_true", help="skip the whole-network timings")
    parser.add_argument("--nets", default=None, help="comma-separated subset of " + ",".join(c[0] for c in NET_CASES))
    parser.add_argument("--name", default="fused_prelu", help="results file name (benchmarks/results/<name>.json)")
    parser.add_argument("--mxnet-default-threads", action="store_true",
                        help="keep MXNet's default OpenMP threads (cores / 2) instead of configure_threads(), "
                             "which every training entry point calls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = None if args.mxnet_default_threads else configure_threads().as_dict()
    if not ops.load():
        raise SystemExit(f"fused PReLU operator unavailable: {ops.status()}")
    payload = {
        "what": "fused_prelu C++ operator (symbols/ops) vs fast_prelu graph vs ReLU. layers: forward+backward of "
                "the activation alone, best of repeats, ms. nets: training step throughput (forward+backward+SGD "
                f"update), synthetic 112x112 input, ArcFace head, {NUM_CLASSES} classes, batch {BATCH}, one CPU "
                "context, best of the interleaved repetitions; fused net = symbols.ops.fuse_symbol(fast_prelu net)",
        "operator": ops.status(),
        "threads": threads or "MXNet default (cores / 2)",
        "command": "python -m benchmarks.bench_fused_prelu " + " ".join(argv or []),
    }
    if not args.no_layers:
        payload["layers"] = run_layers(steps=3, repeats=2)
    if not args.no_nets:
        wanted = args.nets.split(",") if args.nets else [c[0] for c in NET_CASES]
        nets = {}
        for label, network, multiplier, steps, repeats in NET_CASES:
            if label not in wanted or (args.quick and label not in QUICK_NETS):
                continue
            nets[label] = run_net(label, network, multiplier, steps, repeats)
            print(f"{label:10s} " + "  ".join(f"{k}={v:.2f}/s" for k, v in nets[label]["samples_per_sec"].items())
                  + f"  fused/relu={nets[label]['fused_vs_relu']:.2f}"
                  + f"  fast/relu={nets[label]['fast_prelu_vs_relu']:.2f}", flush=True)
        payload["nets"] = nets
    path = write_json(args.name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
