"""fc7 at scale: time per training step and memory of the classifier at 10^4, 10^5, 10^6 classes x 512-d.

Three variants on the same global batch (128 embeddings), ArcFace head, SGD momentum 0.9:

* ``full``: the single-device symbol (one context, ``fc7_weight`` C x 512, SoftmaxOutput) as a plain Module;
* ``model_parallel``: :class:`recognition.model_parallel.ModelParallelModule` with 2 shards (insightface
  ``recognition/arcface_mxnet/train_parall.py`` semantics);
* ``partial_fc``: the same with ``sample_rate = 0.1`` (insightface ``recognition/partial_fc/mxnet``).

The "backbone" is one FullyConnected (16 -> 512, named ``fc1``) so the step time is the classifier's. Every
(variant, C) runs in a fresh process: ``peak_rss_mb`` is that process's peak resident memory and
``fc7_bytes_per_shard`` the bytes of the allocated fc7 parameter arrays of each shard (their gradient and
momentum arrays have the same size for ``full``/``model_parallel``). CPU contexts stand in for devices (they
share this machine's RAM and cores), so the memory split is read from the allocated arrays; the step time of
two CPU shards is not faster than one (same cores). The machine is shared: the load average before/after every
run is recorded.

Usage: ``python -m benchmarks.bench_fc7_scale [--classes 10000,100000,1000000] [--steps N] [--variants full,...]
[--merge]`` (``--merge`` re-runs only the given cells and keeps the others)
-> ``benchmarks/results/fc7_scale.json``.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMB, BATCH, IN_DIM = 512, 128, 16
VARIANTS = ("full", "model_parallel", "partial_fc")


def _child(variant, num_classes, steps, warmup):
    """Run in a fresh process: bind, warm up, time ``steps`` steps; print one JSON line."""
    import resource

    import mxnet as mx
    import numpy as np

    from recognition.config import load_config
    from recognition.model_parallel import ModelParallelModule
    from symbols.losses import head_logits

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limit_mb = float(os.environ.get("FC7_BENCH_LIMIT_MB", "0"))
    if limit_mb > 0:  # fail with an allocation error instead of waking the OOM killer on a shared machine
        resource.setrlimit(resource.RLIMIT_AS, (int(limit_mb * 2 ** 20), int(limit_mb * 2 ** 20)))
    shards = 1 if variant == "full" else 2
    cfg = load_config(overrides=dict(network="r18", loss="arcface", num_classes=num_classes, emb_size=EMB,
                                     per_batch_size=BATCH // shards, model_parallel=variant != "full",
                                     sample_rate=0.1 if variant == "partial_fc" else 1.0, val_targets=[], seed=0))
    data, label = mx.sym.var("data"), mx.sym.var("softmax_label")
    emb = mx.sym.FullyConnected(data, num_hidden=EMB, name="fc1")
    logits = head_logits(emb, label, "arcface", num_classes, EMB, s=cfg.loss_s, m1=cfg.loss_m1, m2=cfg.loss_m2,
                         m3=cfg.loss_m3)
    sym = mx.sym.Group([mx.sym.BlockGrad(emb), mx.sym.SoftmaxOutput(logits, label, normalization="valid")])
    contexts = [mx.cpu(i) for i in range(shards)]
    if variant == "full":
        module = mx.mod.Module(sym, context=contexts)
    else:
        module = ModelParallelModule(sym, contexts, cfg)
    module.bind([("data", (BATCH, IN_DIM))], [("softmax_label", (BATCH,))])
    mx.random.seed(0)
    module.init_params(mx.init.Xavier())
    module.init_optimizer(kvstore="device", optimizer=mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=5e-4,
                                                                       rescale_grad=1.0 / shards))
    rng = np.random.RandomState(0)
    batches = [mx.io.DataBatch([mx.nd.array(rng.randn(BATCH, IN_DIM))],
                               [mx.nd.array(rng.randint(0, num_classes, BATCH).astype(np.float32))])
               for _ in range(4)]
    if variant == "full":
        fc7 = [num_classes * EMB * 4]
    else:
        fc7 = [int(b["params"]) for b in module.fc7_nbytes()]
    times = []
    for i in range(warmup + steps):
        tic = time.perf_counter()
        module.forward_backward(batches[i % len(batches)])
        module.update()
        mx.nd.waitall()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "num_classes": num_classes, "shards": shards, "steps": steps,
                      "sec_per_step": float(np.median(times)), "sec_per_step_all": times,
                      "peak_rss_mb": peak / 1024.0, "rss_after_import_mb": base_rss / 1024.0,
                      "fc7_bytes_per_shard": fc7, "fc7_bytes_full": num_classes * EMB * 4}))


def _available_mb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run(variant, num_classes, steps, warmup):
    load_before = os.getloadavg()
    available = _available_mb()
    env = dict(os.environ, PYTHONPATH=REPO)
    if available and "FC7_BENCH_LIMIT_MB" not in os.environ:  # address space: RSS + ~2.5 GB of mappings
        env["FC7_BENCH_LIMIT_MB"] = str(available - 1024 + 2560)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_fc7_scale", "--child", variant,
                           str(num_classes), str(steps), str(warmup)], cwd=REPO, capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "Subgraph backend" not in ln]
        return {"variant": variant, "num_classes": num_classes, "returncode": proc.returncode,
                "error": lines[-3:], "loadavg_before": list(load_before), "mem_available_mb_before": available,
                "address_space_limit_mb": float(env.get("FC7_BENCH_LIMIT_MB", 0))}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_before"], result["loadavg_after"] = list(load_before), list(os.getloadavg())
    result["mem_available_mb_before"], result["mem_available_mb_after"] = available, _available_mb()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="10000,100000,1000000")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--merge", action="store_true", help="keep the other results already in fc7_scale.json")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        variant, c, steps, warmup = args.child
        return _child(variant, int(c), int(steps), int(warmup))
    from benchmarks.common import RESULTS_DIR, write_json
    results = []
    todo = [(int(c), v) for c in args.classes.split(",") for v in args.variants.split(",")]
    previous = os.path.join(RESULTS_DIR, "fc7_scale.json")
    if args.merge and os.path.isfile(previous):
        with open(previous) as f:
            results = [r for r in json.load(f)["results"] if (r["num_classes"], r["variant"]) not in todo]
    for c, variant in todo:
        steps = args.steps if c < 1000000 else max(2, args.steps // 2)
        r = run(variant, c, steps, args.warmup)
        print(json.dumps({k: v for k, v in r.items() if k != "sec_per_step_all"}), flush=True)
        results.append(r)
    results.sort(key=lambda r: (r["num_classes"], VARIANTS.index(r["variant"])))
    summary = {}
    for c in sorted({r["num_classes"] for r in results}):
        by = {r["variant"]: r for r in results if r["num_classes"] == c and "error" not in r}
        if "full" in by:
            full = by["full"]
            summary[str(c)] = {
                "partial_fc_time_ratio": by["partial_fc"]["sec_per_step"] / full["sec_per_step"]
                if "partial_fc" in by else None,
                "model_parallel_time_ratio": by["model_parallel"]["sec_per_step"] / full["sec_per_step"]
                if "model_parallel" in by else None,
                "fc7_shard_memory_ratio": max(by["model_parallel"]["fc7_bytes_per_shard"]) / full["fc7_bytes_full"]
                if "model_parallel" in by else None,
            }
    path = write_json("fc7_scale", {"head": "arcface", "emb_size": EMB, "batch": BATCH, "results": results,
                                    "summary": summary,
                                    "targets": {"partial_fc_time_ratio_at_1e6": "<= 0.2",
                                                "fc7_shard_memory_ratio_2_shards": "0.5"}})
    print(json.dumps(summary, indent=1))
    print(path)


if __name__ == "__main__":
    main()
