"""Does reduced precision speed up training on this CPU? float32 vs bfloat16 (oneDNN) vs float16, one process.

MXNet 1.9's bfloat16 path on CPU is oneDNN (``mx.runtime.Features()`` MKLDNN; the CPU needs avx512_bf16/amx for
native bf16 arithmetic). ``mx.contrib.amp.convert_symbol(target_dtype='bfloat16')`` does not bind under Module here
(weights of unknown dtype), and ``mx.sym.amp_cast(dtype='bfloat16')`` is refused by the Python front end (numpy
has no bfloat16), so the bfloat16 graph is written as JSON: ``amp_cast`` of the data and of every convolution
weight to bfloat16 (float32 master weights, as AMP does), back to float32 before the classifier. float16 is
built with ``mx.sym.Cast`` (what ``--fp16`` does). Each variant trains (forward + backward + SGD) ``--steps``
steps of a 6-layer 3x3 convolution stack (64 channels, 56x56, batch 32: the shape of an r50 stage-1 block) and
runs inference, reporting wall images/s and CPU seconds per image (less sensitive to other processes).

    OMP_NUM_THREADS=2 python -m benchmarks.bench_mixed_precision [--steps 5]

Writes ``benchmarks/results/mixed_precision.json``.
"""
import argparse
import os
import sys
import time

import mxnet as mx
import numpy as np

from benchmarks.common import write_json
from eval.runtime import configure_threads

B, C, S, LAYERS = 32, 64, 56, 6


def conv_stack(dtype):
    x = mx.sym.Variable("data")
    if dtype == "float16":  # as --fp16: Cast, float16 weights (SGD multi_precision keeps float32 masters)
        x = mx.sym.Cast(x, dtype="float16")
    elif dtype == "bfloat16":
        x = mx.sym.amp_cast(x, dtype="float16")
    for i in range(LAYERS):
        w = mx.sym.Variable(f"c{i}_weight")
        if dtype == "bfloat16":
            w = mx.sym.amp_cast(w, dtype="float16")
        x = mx.sym.Convolution(x, weight=w, num_filter=C, kernel=(3, 3), pad=(1, 1), no_bias=True, name=f"c{i}")
        x = mx.sym.Activation(x, act_type="relu")
    if dtype == "float16":
        x = mx.sym.Cast(x, dtype="float32")
    elif dtype == "bfloat16":
        x = mx.sym.amp_cast(x, dtype="float32")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    x = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=10, name="fc")
    sym = mx.sym.SoftmaxOutput(x, name="softmax")
    if dtype == "bfloat16":  # the front end refuses 'bfloat16'; the graph JSON is accepted
        sym = mx.sym.load_json(sym.tojson().replace('"dtype": "float16"', '"dtype": "bfloat16"'))
    return sym


def run(dtype, train, steps):
    mod = mx.mod.Module(conv_stack(dtype), context=mx.cpu())
    mod.bind(data_shapes=[("data", (B, C, S, S))], label_shapes=[("softmax_label", (B,))], for_training=train)
    mx.random.seed(0)
    mod.init_params(mx.init.Xavier())
    if train:
        mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01, "multi_precision": True})
    batch = mx.io.DataBatch([mx.nd.random.uniform(shape=(B, C, S, S))], [mx.nd.array(np.arange(B) % 10)])

    def step():
        if train:
            mod.forward_backward(batch)
            mod.update()
        else:
            mod.forward(batch, is_train=False)

    for _ in range(2):
        step()
    mx.nd.waitall()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    mx.nd.waitall()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"dtype": dtype, "mode": "train" if train else "inference", "images_per_sec": round(steps * B / wall, 2),
            "cpu_s_per_image": round(cpu / (steps * B), 5), "load_average_1min": round(os.getloadavg()[0], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    threads = configure_threads()
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    features = mx.runtime.Features()
    results = {"cpu_flags": sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "f16c")}),
               "mxnet_features": {k: features.is_enabled(k) for k in ("MKLDNN", "CUDA", "CUDNN", "F16C")},
               "threads": str(threads), "shape": {"batch": B, "channels": C, "side": S, "conv_layers": LAYERS}, "runs": []}
    for _ in range(args.repeats):
        for dtype in ("float32", "bfloat16", "float16"):
            for train in (False, True):
                try:
                    res = run(dtype, train, args.steps)
                except (mx.base.MXNetError, RuntimeError) as exc:
                    lines = [ln for ln in str(exc).strip().splitlines() if "Error" in ln or "not implemented" in ln]
                    res = {"dtype": dtype, "mode": "train" if train else "inference",
                           "error": (lines or [str(exc)])[-1][:200]}
                print(res, flush=True)
                results["runs"].append(res)
    best = {}
    for r in results["runs"]:
        if "cpu_s_per_image" in r:
            key = f"{r['dtype']} {r['mode']}"
            best[key] = min(best.get(key, 1e9), r["cpu_s_per_image"])
    results["best_cpu_s_per_image"] = best
    print(best)
    print(write_json("mixed_precision", results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
