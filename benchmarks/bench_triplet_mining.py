"""Mining speed: ``iterators.pick_triplets`` vs a direct port of insightface's per-pair loop.

Run: ``python -m benchmarks.bench_triplet_mining [--output benchmarks/results]`` (a few minutes on 2
cores: the port spends ~45 s per bag computing distance rows one anchor at a time).

The bag is insightface's default: 7,200 L2-normalised 512-d embeddings, 5 images per identity
(1,440 identities), alpha 0.3. Embeddings are class centre + Gaussian noise; the noise level sets how
many (anchor, positive) pairs still have semi-hard negatives:

* ``pretrained``: identities well separated, as after softmax/ArcFace pre-training (~1% of pairs);
* ``mixed``: about half of the pairs yield a triplet;
* ``random``: every pair has many candidates, as at random initialisation.

For every scenario the benchmark times (wall clock and process CPU time, which stays meaningful when
other jobs share the machine)

1. the port, ``upstream_pick_triplets``: distance rows in float32 one image at a time (upstream's
   ``pairwise_dists`` uses ``mx.nd.array``, float32, on a GPU; numpy here) and the per-pair Python loop
   with float64 positive distances, as upstream;
2. ``pick_triplets`` (best of ``--repeats``);

and checks (a) that every (anchor, positive) pair has the same candidate set in ``semi_hard_candidates``
and in the port's loop run on float64 distance rows (computed by one float64 matrix product instead of
row by row, to keep the check fast; both then decide in float64, so rounding cannot flip a decision),
and (b) that ``pick_triplets`` returned exactly one triplet for each pair with candidates, with a
negative from that pair's set. ``port_float32_candidate_diffs`` counts the (pair, negative)
memberships on which upstream's own float32 distances disagree with the exact sets: upstream rounding,
not a difference of the rule. Results go to ``<output>/triplet_mining.json``.
"""
import argparse
import json
import os
import platform
import time

import numpy as np

from iterators.triplet_mining import pick_triplets, semi_hard_candidates

BAG_SIZE = 7200
IMAGES_PER_IDENTITY = 5
EMB_SIZE = 512
ALPHA = 0.3
# Noise std per dimension relative to a unit-variance class centre.
SCENARIOS = {"pretrained": 1.2, "mixed": 1.5, "random": 3.0}


def upstream_pairwise_dists(embeddings, dtype=np.float32):
    """Port of insightface ``TripletFaceImageIter.pairwise_dists``: one distance row per image.

    Upstream computes ``sum((e_i - E)^2, axis=1)`` with ``mx.nd`` on ``mx.gpu(i % ctx_num)`` (float32);
    numpy on the CPU replaces the GPU (insightface ``src/triplet_image_iter.py`` ``pick_triplets``).
    """
    emb = np.asarray(embeddings, dtype=dtype)
    return [np.sum(np.square(emb[idx] - emb), axis=1) for idx in range(emb.shape[0])]


def upstream_pick_triplets(embeddings, nrof_images_per_class, alpha, max_ap=0.0, pdists=None, candidates=None):
    """Direct port of insightface ``TripletFaceImageIter.pick_triplets`` (per-pair Python loop).

    ``pdists``: distance rows to use (default: :func:`upstream_pairwise_dists`, float32).
    ``candidates``, when a dict, receives ``(a, p) -> all_neg`` for every pair reaching the rule.
    Keeps upstream's in-place NaN write into its (private) distance rows; the library does not.
    """
    emb_start_idx = 0
    triplets = []
    if pdists is None:
        pdists = upstream_pairwise_dists(embeddings)
    for nrof_images in nrof_images_per_class:
        nrof_images = int(nrof_images)
        for j in range(1, nrof_images):
            a_idx = emb_start_idx + j - 1
            neg_dists_sqr = pdists[a_idx]
            for pair in range(j, nrof_images):
                p_idx = emb_start_idx + pair
                pos_dist_sqr = np.sum(np.square(embeddings[a_idx] - embeddings[p_idx]))
                neg_dists_sqr[emb_start_idx:emb_start_idx + nrof_images] = np.nan
                if max_ap > 0.0 and pos_dist_sqr > max_ap:
                    continue
                all_neg = np.where(np.logical_and(neg_dists_sqr - pos_dist_sqr < alpha,
                                                  pos_dist_sqr < neg_dists_sqr))[0]
                if candidates is not None:
                    candidates[(a_idx, p_idx)] = all_neg
                if all_neg.shape[0] > 0:
                    n_idx = all_neg[np.random.randint(all_neg.shape[0])]
                    triplets.append((a_idx, p_idx, n_idx))
        emb_start_idx += nrof_images
    np.random.shuffle(triplets)
    return triplets


def float64_dist_rows(embeddings, block=1024):
    """Rows of squared distances in float64 by matrix products (reference for the candidate check)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    sq = np.einsum("ij,ij->i", emb, emb)
    rows = []
    for lo in range(0, emb.shape[0], block):
        d = sq[lo:lo + block, None] + sq[None, :] - 2.0 * (emb[lo:lo + block] @ emb.T)
        rows.extend(np.maximum(d, 0.0))
    return rows


class Timer:
    """Wall-clock and process CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def make_bag(noise, seed=0):
    """(7200, 512) float64 L2-normalised embeddings, 5 consecutive rows per identity."""
    rng = np.random.default_rng(seed)
    num_ids = BAG_SIZE // IMAGES_PER_IDENTITY
    centres = rng.standard_normal((num_ids, EMB_SIZE))
    emb = np.repeat(centres, IMAGES_PER_IDENTITY, axis=0) + noise * rng.standard_normal((BAG_SIZE, EMB_SIZE))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, [IMAGES_PER_IDENTITY] * num_ids


def count_candidate_diffs(reference, other):
    """Number of (pair, negative) memberships on which two candidate dicts disagree."""
    diffs = 0
    for key in set(reference) | set(other):
        a = reference.get(key, np.zeros(0, dtype=np.int64))
        b = other.get(key, np.zeros(0, dtype=np.int64))
        diffs += np.setxor1d(a, b).size
    return diffs


def run_scenario(name, noise, repeats):
    emb, sizes = make_bag(noise)
    np.random.seed(0)
    with Timer() as port_rows:
        pdists32 = upstream_pairwise_dists(emb)
    port32_candidates = {}
    with Timer() as port_loop:
        port_triplets = upstream_pick_triplets(emb, sizes, ALPHA, pdists=pdists32, candidates=port32_candidates)
    port_wall, port_cpu = port_rows.wall + port_loop.wall, port_rows.cpu + port_loop.cpu

    pick_triplets(emb, sizes, ALPHA, rng=0)                     # warm-up (BLAS threads, page faults)
    runs = []
    for rep in range(repeats):
        with Timer() as run:
            ours = pick_triplets(emb, sizes, ALPHA, rng=rep)
        runs.append(run)
    best_wall, best_cpu = min(r.wall for r in runs), min(r.cpu for r in runs)

    port64_candidates = {}
    upstream_pick_triplets(emb, sizes, ALPHA, pdists=float64_dist_rows(emb), candidates=port64_candidates)
    exact = semi_hard_candidates(emb, sizes, ALPHA)
    exact_nonempty = {k: v for k, v in exact.items() if v.size}
    port64_nonempty = {k: v for k, v in port64_candidates.items() if v.size}
    same = (exact_nonempty.keys() == port64_nonempty.keys()
            and all(np.array_equal(exact_nonempty[k], port64_nonempty[k]) for k in exact_nonempty))
    triplets_valid = ({(a, p) for a, p, _ in ours} == set(exact_nonempty) and len(ours) == len(exact_nonempty)
                      and all(n in set(exact[(a, p)].tolist()) for a, p, n in ours))
    return {
        "scenario": name,
        "noise_std": noise,
        "pairs": len(exact),
        "pairs_with_candidates": len(exact_nonempty),
        "candidates_total": int(sum(v.size for v in exact.values())),
        "triplets_ours": len(ours),
        "triplets_port": len(port_triplets),
        "port_seconds": round(port_wall, 3),
        "port_cpu_seconds": round(port_cpu, 3),
        "port_dist_rows_seconds": round(port_rows.wall, 3),
        "port_pair_loop_seconds": round(port_loop.wall, 3),
        "ours_seconds_best": round(best_wall, 4),
        "ours_cpu_seconds_best": round(best_cpu, 4),
        "ours_seconds_all": [round(r.wall, 4) for r in runs],
        "speedup_wall": round(port_wall / best_wall, 1),
        "speedup_cpu": round(port_cpu / best_cpu, 1),
        "speedup_vs_port_pair_loop_only": round(port_loop.wall / best_wall, 1),
        "same_candidate_sets_as_port_float64": bool(same),
        "ours_one_valid_triplet_per_pair_with_candidates": bool(triplets_valid),
        "port_float32_candidate_diffs": count_candidate_diffs(exact_nonempty, port32_candidates),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results", help="directory for triplet_mining.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of pick_triplets per scenario")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    results = []
    load_at_start = round(os.getloadavg()[0], 2)
    for name in args.scenarios.split(","):
        result = run_scenario(name, SCENARIOS[name], args.repeats)
        print(json.dumps(result))
        results.append(result)
    report = {
        "benchmark": "triplet_mining",
        "bag_size": BAG_SIZE, "images_per_identity": IMAGES_PER_IDENTITY, "emb_size": EMB_SIZE, "alpha": ALPHA,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "load_average_1min_at_start": load_at_start},
        "note": "speedup_* = port time / best pick_triplets time; CPU seconds include every BLAS thread",
        "results": results,
    }
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "triplet_mining.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
