"""Training-step throughput (forward + backward + SGD update) of the engine's symbols on synthetic input.

For r18/r34/r50 (fresnet, quarter width by default: full width is ~1 image/s on a 2-core CPU) and y1
(MobileFaceNet), ArcFace head with ``--num-classes`` identities, at global batch 32 and 64, on one and on two
CPU contexts (the global batch split across them, as ``--ctx cpu:2``). Full-width r50 is measured at batch 32
on one context only. Results -> ``benchmarks/results/train.json`` (samples/s per configuration + machine load).

    python -m benchmarks.bench_train                      # a few minutes on 2 idle cores
    python -m benchmarks.bench_train --networks r18 --batches 32 --contexts 1 --steps 2
"""
import argparse
import logging
import time

import mxnet as mx

from benchmarks.common import measure_train_throughput, write_json

logger = logging.getLogger(__name__)

IMAGE = 112  # insightface input size


def _symbol(network, multiplier, num_classes, per_device_batch):
    import symbols
    from recognition.config import load_config
    overrides = {"network": network, "num_classes": num_classes, "loss": "arcface", "per_batch_size": per_device_batch}
    if network.startswith("y"):
        overrides.update(emb_size=128, net_output="GDC")
    else:
        overrides["net_multiplier"] = multiplier
    return symbols.get_symbol(load_config(overrides=overrides))


def run(networks, batches, contexts, multiplier, full_width, num_classes, steps, warmup, on_result=None):
    """Measure every configuration; returns a list of result dicts (``on_result(results)`` after each)."""
    plan = [(net, multiplier, batch, ctx) for net in networks for batch in batches for ctx in contexts]
    plan += [(net, 1.0, 32, 1) for net in full_width]
    results = []
    for net, mult, batch, num_ctx in plan:
        if batch % num_ctx:
            continue
        ctxs = [mx.cpu(i) for i in range(num_ctx)]
        tic = time.time()
        sym = _symbol(net, mult, num_classes, batch // num_ctx)
        res = measure_train_throughput(sym, (batch, 3, IMAGE, IMAGE), contexts=ctxs, steps=steps, warmup=warmup,
                                       num_classes=num_classes)
        res.update(network=net, net_multiplier=None if net.startswith("y") else mult, global_batch=batch,
                   num_contexts=num_ctx, wall_seconds=time.time() - tic)
        logger.info("%s x%s batch %d on %d ctx: %.1f samples/s", net, res["net_multiplier"], batch, num_ctx,
                    res["samples_per_sec"])
        results.append(res)
        if on_result is not None:
            on_result(results)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--networks", default="r18,r34,r50,y1")
    p.add_argument("--batches", default="32,64")
    p.add_argument("--contexts", default="1,2", help="numbers of CPU contexts to try")
    p.add_argument("--multiplier", type=float, default=0.25, help="fresnet width multiplier of the sweep")
    p.add_argument("--full-width", default="r50", help="networks also measured at full width (batch 32, 1 ctx)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--name", default="train", help="results file benchmarks/results/<name>.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    split = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    header = {"image_size": IMAGE, "num_classes": args.num_classes, "loss": "arcface", "steps": args.steps,
              "warmup": args.warmup}

    def save(results):  # after every configuration, so a stopped run keeps what it measured
        return write_json(args.name, {**header, "results": results})
    results = run(split(args.networks), [int(b) for b in split(args.batches)], [int(c) for c in split(args.contexts)],
                  args.multiplier, split(args.full_width), args.num_classes, args.steps, args.warmup, on_result=save)
    path = save(results)
    for r in results:
        print(f"{r['network']:>4} x{r['net_multiplier']} batch {r['global_batch']:>3} ctx {r['num_contexts']}: "
              f"{r['samples_per_sec']:8.1f} samples/s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
