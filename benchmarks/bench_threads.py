"""Training throughput on one CPU context before (MXNet's default threads) and after ``eval.runtime.configure_threads``.

Each measurement runs in a fresh process (MXNet reads its thread settings when it loads):

* ``default``: the environment without any thread variable (OMP_NUM_THREADS, MXNET_OMP_MAX_THREADS, ...);
  MXNet 1.9.1 then uses ``cores / 2`` OpenMP threads on x86 (1 on a 2-core machine);
* ``configured``: the same environment; the process imports mxnet, then calls ``configure_threads()`` as the
  entry points do (the run-time path), and records what it chose and what an engine worker reads back.

Runs alternate default/configured so drifting load from other processes hits both; every run records the
1-minute load average before it and the process's CPU time / wall time (cores actually used). On a machine
busy with other work, ``--nice -20`` (root) starts each measured process in its own session (scheduler
autogroup) at nice -20 so it competes better (it still loses a share: OpenMP barriers wait for any descheduled
thread); the value and each run's autogroup are recorded (an OpenMP team of 2 on 2 oversubscribed cores is 2-3x SLOWER than 1 thread: see eval/runtime).

    python -m benchmarks.bench_threads                      # r18 x0.25, r18 x1, r50 x0.25, y1 (~10 min idle)
    python -m benchmarks.bench_threads --configs r18:0.25 --repeats 1 --steps 2
Results -> ``benchmarks/results/threads.json``.
"""
import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

IMAGE = 112
DEFAULT_CONFIGS = "r18:0.25,r18:1.0,r50:0.25,y1"
CLEAN_VARS = ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MKL_NUM_THREADS",
              "OPENBLAS_NUM_THREADS", "MXNET_ENGINE_TYPE")


def _worker(args):
    """One measurement in this process; prints one JSON line."""
    import mxnet as mx  # noqa: F401 -- imported first, as `python -m eval.verification` does

    from benchmarks.bench_train import _symbol
    from benchmarks.common import measure_train_throughput
    setting = None
    if args.mode == "configured":
        from eval.runtime import configure_threads
        setting = configure_threads(log=False).as_dict()
    network, _, mult = args.config.partition(":")
    sym = _symbol(network, float(mult or 1.0), args.num_classes, args.batch)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = measure_train_throughput(sym, (args.batch, 3, IMAGE, IMAGE), steps=args.steps, warmup=args.warmup,
                                   num_classes=args.num_classes)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    res["cores_used"] = ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / wall
    res["thread_setting"] = setting
    res["autogroup"] = _autogroup()
    print("RESULT " + json.dumps(res), flush=True)


def _prioritize(nice):
    """In the measured child: its own session (so its own scheduler autogroup, when autogroups are on) at
    ``nice``; plain nice values do not reach across autogroups."""
    os.setsid()
    try:
        with open("/proc/self/autogroup", "w", encoding="ascii") as f:
            f.write(str(nice))
    except OSError:
        pass
    os.nice(nice)


def _autogroup():
    try:
        with open("/proc/self/autogroup", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _run_one(config, mode, args):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_VARS}
    cmd = [sys.executable, "-m", "benchmarks.bench_threads", "--worker", "--mode", mode, "--config", config,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--num-classes", str(args.num_classes)]
    load = os.getloadavg()[0]
    tic = time.time()
    preexec = (lambda: _prioritize(args.nice)) if args.nice else None
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, preexec_fn=preexec,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    res = json.loads(line[-1][len("RESULT "):])
    res.update(mode=mode, config=config, loadavg_1min_before=load, loadavg_1min_after=os.getloadavg()[0],
               wall_seconds=time.time() - tic)
    logger.info("%-9s %-10s %6.2f samples/s  cores used %.2f  (load before %.2f)", config, mode,
                res["samples_per_sec"], res["cores_used"], load)
    return res


def summarize(runs):
    """Per config: median samples/s of each mode and the speed-up configured / default."""
    table = {}
    for config in dict.fromkeys(r["config"] for r in runs):
        row = {}
        for mode in ("default", "configured"):
            values = [r["samples_per_sec"] for r in runs if r["config"] == config and r["mode"] == mode]
            cores = [r["cores_used"] for r in runs if r["config"] == config and r["mode"] == mode]
            row[mode] = {"samples_per_sec_median": statistics.median(values) if values else None,
                         "samples_per_sec_all": values, "cores_used_median": statistics.median(cores) if cores else None}
        if row["default"]["samples_per_sec_median"] and row["configured"]["samples_per_sec_median"]:
            row["speedup"] = row["configured"]["samples_per_sec_median"] / row["default"]["samples_per_sec_median"]
        table[config] = row
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="network[:width multiplier], comma separated")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--name", default="threads")
    p.add_argument("--nice", type=int, default=0,
                   help="run the measured processes at this nice value (e.g. -20 as root: on a machine busy with "
                        "other work the measured process then gets the cores almost as on an idle machine)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("default", "configured"), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from benchmarks.common import write_json
    configs = [c for c in args.configs.split(",") if c]
    header = {"image_size": IMAGE, "global_batch": args.batch, "contexts": 1, "num_classes": args.num_classes,
              "loss": "arcface", "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "nice": args.nice,
              "command": "python -m benchmarks.bench_threads " + " ".join(argv if argv is not None else sys.argv[1:])}
    runs = []
    for _ in range(args.repeats):
        for config in configs:
            for mode in ("default", "configured"):
                runs.append(_run_one(config, mode, args))
                write_json(args.name, {**header, "summary": summarize(runs), "runs": runs})
    summary = summarize(runs)
    path = write_json(args.name, {**header, "summary": summary, "runs": runs})
    for config, row in summary.items():
        logger.info("%-9s default %6.2f -> configured %6.2f samples/s  (x%.2f)", config,
                    row["default"]["samples_per_sec_median"], row["configured"]["samples_per_sec_median"],
                    row.get("speedup", float("nan")))
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
