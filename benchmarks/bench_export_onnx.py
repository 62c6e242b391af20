"""ONNX export at full width: export time, file size, proof (ONNX Runtime vs MXNet) and inference speed.

Run: ``python -m benchmarks.bench_export_onnx [--networks r50,y1] [--output benchmarks/results]``
(needs ``pip install -e ".[onnx]"``; a few minutes on 2 cores).

For each network, an embedding-only checkpoint in insightface's form (LeakyReLU PReLU, ``arg:``/``aux:`` params,
112x112, insightface's default embedding size and fc type: r50 512-d ``E``, y1 128-d ``GDC``) with randomised
BatchNorm statistics and slopes is exported by ``eval.export_onnx`` (dynamic batch, default opset), checked on
16 random images, and both runtimes embed batches of 1 and 8 (median of ``--repeats`` after one warm-up).
Export wall time and CPU time are both recorded: the shared development machine is often loaded.
Writes ``<output>/export_onnx.json``.
"""
import argparse
import json
import os
import platform
import tempfile
import time

import mxnet as mx
import numpy as np

import symbols
from eval import export_onnx as eo
from eval.inference import load_embedding_module
from iterators.formats.atomic import atomic_write_text

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SIZE = (112, 112)


def make_checkpoint(prefix, network):
    preset = symbols.NETWORKS.lookup(network).preset
    emb = preset.get("emb_size", 512)
    sym = symbols.get_embedding(network, emb_size=emb, fc_type=preset.get("net_output", "E"), fast_prelu=False)
    mod = mx.mod.Module(sym, label_names=None)
    mod.bind([("data", (1, 3) + SIZE)], for_training=False)
    mod.init_params(symbols.get_initializer(network))
    arg, aux = mod.get_params()
    rng = np.random.RandomState(0)
    arg = {k: mx.nd.array(rng.uniform(0.3, 1.2, v.shape)) if k.endswith("_gamma") else v for k, v in arg.items()}
    aux = {k: mx.nd.array(rng.uniform(0.5, 1.5, v.shape) if "var" in k else rng.normal(0, 0.05, v.shape))
           for k, v in aux.items()}
    mx.model.save_checkpoint(prefix, 0, sym, arg, aux)
    return emb


def _median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def bench(network, workdir, repeats):
    prefix = os.path.join(workdir, network, "model")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    emb = make_checkpoint(prefix, network)
    path = os.path.join(workdir, f"{network}.onnx")
    info = eo.export_checkpoint(prefix, 0, path, image_size=SIZE)
    report = eo.check(path, prefix, 0, image_size=SIZE, batch_size=8)
    result = {"network": network, "emb_size": emb, "export_seconds": round(info["seconds"], 2),
              "export_cpu_seconds": round(info["cpu_seconds"], 2), "onnx_bytes": info["bytes"],
              "onnx_mb": round(info["bytes"] / 1e6, 1), "max_rel_diff": report["max_rel_diff"],
              "passed": report["passed"], "prelu": info["fast_prelu"] + info["fused_prelu"] or "LeakyReLU"}
    sess = eo.session(path)
    for batch in (1, 8):
        x = np.random.RandomState(1).uniform(0, 255, (batch, 3) + SIZE).astype(np.float32)
        module = load_embedding_module(prefix, 0, mx.cpu(), batch, SIZE)
        nd = mx.nd.array(x)

        def mx_run():
            module.forward(mx.io.DataBatch(data=(nd,)), is_train=False)
            module.get_outputs()[0].asnumpy()

        result[f"onnxruntime_ms_batch{batch}"] = round(1e3 * _median_time(lambda: sess.run(None, {"data": x}),
                                                                          repeats), 1)
        result[f"mxnet_ms_batch{batch}"] = round(1e3 * _median_time(mx_run, repeats), 1)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="r50,y1")
    parser.add_argument("--output", default=RESULTS_DIR)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for network in args.networks.split(","):
            res = bench(network, workdir, args.repeats)
            print(json.dumps(res))
            results.append(res)
    payload = {"benchmark": "export_onnx", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                       "loadavg_1min": round(os.getloadavg()[0], 2)},
               "results": results}
    path = os.path.join(args.output, "export_onnx.json")
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
