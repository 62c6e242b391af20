"""PReLU formulations: training throughput of r18 / r50 / y1 with LeakyReLU(prelu), fast PReLU and ReLU.

Every network is timed with the three activations in the same run (forward + backward + SGD update,
synthetic 112x112 input, batch 32, ArcFace head), interleaved per repetition so that a change of machine
load hits all three alike; the best repetition is reported. Writes ``benchmarks/results/prelu.json``.

    python -m benchmarks.bench_prelu                # full set (several minutes on 2 cores)
    python -m benchmarks.bench_prelu --quick        # quarter-width r18 and y1 only

Threads: ``eval.runtime.configure_threads`` (all usable cores), as every training entry point does.
"""
import argparse
import logging

import symbols
from benchmarks.common import measure_train_throughput, write_json
from eval.runtime import configure_threads

logger = logging.getLogger(__name__)

# activation label -> (net_act, fast_prelu)
FORMULATIONS = {"prelu": ("prelu", False), "fast_prelu": ("prelu", True), "relu": ("relu", True)}
# (label, network, net_multiplier, timed steps, repetitions): full widths are slow on CPU, so few steps.
CASES = [
    ("r18_x0.25", "r18", 0.25, 4, 2),
    ("y1", "y1", 1.0, 2, 1),
    ("r18", "r18", 1.0, 2, 1),
    ("r50", "r50", 1.0, 1, 1),
]
QUICK_CASES = ("r18_x0.25", "y1")
BATCH = 32
NUM_CLASSES = 1000


def build(network, multiplier, net_act, fast):
    return symbols.get_symbol({"network": network, "net_multiplier": multiplier, "net_act": net_act,
                               "fast_prelu": fast, "num_classes": NUM_CLASSES, "per_batch_size": BATCH,
                               "loss": "arcface"})


def run_case(label, network, multiplier, steps, repeats):
    """Time the three formulations ``repeats`` times (interleaved); keep each one's best."""
    best = {}
    for rep in range(repeats):
        for name, (net_act, fast) in FORMULATIONS.items():
            result = measure_train_throughput(build(network, multiplier, net_act, fast), (BATCH, 3, 112, 112),
                                              steps=steps, warmup=1)
            logger.info("%s %s rep %d: %.2f samples/s", label, name, rep, result["samples_per_sec"])
            if name not in best or result["samples_per_sec"] > best[name]["samples_per_sec"]:
                best[name] = result
    speeds = {name: r["samples_per_sec"] for name, r in best.items()}
    return {
        "network": network, "net_multiplier": multiplier, "batch_size": BATCH, "steps": steps, "repeats": repeats,
        "samples_per_sec": speeds,
        "sec_per_step": {name: r["sec_per_step"] for name, r in best.items()},
        "speedup_fast_over_prelu": speeds["fast_prelu"] / speeds["prelu"],
        "fast_prelu_vs_relu": speeds["fast_prelu"] / speeds["relu"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only quarter-width r18 and y1")
    parser.add_argument("--name", default="prelu", help="results file name (benchmarks/results/<name>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = configure_threads().as_dict()
    cases = [c for c in CASES if not args.quick or c[0] in QUICK_CASES]
    results = {}
    for label, network, multiplier, steps, repeats in cases:
        results[label] = run_case(label, network, multiplier, steps, repeats)
        print(f"{label:10s} " + "  ".join(f"{k}={v:.2f}/s" for k, v in results[label]["samples_per_sec"].items())
              + f"  fast/prelu={results[label]['speedup_fast_over_prelu']:.2f}"
              + f"  fast/relu={results[label]['fast_prelu_vs_relu']:.2f}", flush=True)
    path = write_json(args.name, {
        "what": "training step throughput (forward+backward+SGD update), synthetic 112x112 input, ArcFace head, "
                f"{NUM_CLASSES} classes, batch {BATCH}, one CPU context; best of the interleaved repetitions",
        "threads": threads,
        "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
