"""Mining speed: ``iterators.pick_triplets`` vs a direct port of insightface's per-pair loop.

Run: ``python -m benchmarks.bench_triplet_mining [--output benchmarks/results]`` (about 5 minutes on
2 cores: the port spends ~40 s per bag computing distance rows one anchor at a time).

The bag is insightface's default: 7,200 L2-normalised 512-d embeddings, 5 images per identity
(1,440 identities). Embeddings are class centre + Gaussian noise; the noise level sets how many
(anchor, positive) pairs still have semi-hard negatives:

* ``pretrained``: identities well separated, as after softmax/ArcFace pre-training (few triplets);
* ``mixed``: about half of the pairs yield a triplet;
* ``random``: nearly every pair has candidates, as at random initialisation.

For every scenario the benchmark times
1. the port with float32 distance rows (upstream computes ``pdists`` with ``mx.nd.array``, whose
   default dtype is float32, while ``pos_dist_sqr`` is float64 numpy): this is the speed reference;
2. ``pick_triplets`` (best of ``--repeats``);
and checks that every (anchor, positive) pair has the same candidate set in the port run with
float64 distance rows and in ``semi_hard_candidates`` (both decide in float64, so no comparison
can flip through rounding). The float32 port's own disagreements with the exact sets are counted
too (``port_float32_candidate_diffs``): they are upstream rounding, not a mining difference.
Results go to ``<output>/triplet_mining.json``.
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
SCENARIOS = {"pretrained": 1.2, "mixed": 2.0, "random": 3.0}


def upstream_pairwise_dists(embeddings, dtype=np.float32):
    """Port of insightface ``TripletFaceImageIter.pairwise_dists``: one distance row per image.

    Upstream computes ``sum((e_i - E)^2, axis=1)`` with ``mx.nd`` on ``mx.gpu(i % ctx_num)`` (float32);
    numpy on the CPU replaces the GPU (spec §4.4).
    """
    emb = np.asarray(embeddings, dtype=dtype)
    return [np.sum(np.square(emb[idx] - emb), axis=1) for idx in range(emb.shape[0])]


def upstream_pick_triplets(embeddings, nrof_images_per_class, alpha, max_ap=0.0, pdist_dtype=np.float32,
                           candidates=None):
    """Direct port of insightface ``TripletFaceImageIter.pick_triplets`` (per-pair Python loop).

    ``candidates``, when a dict, receives ``(a, p) -> all_neg`` for every pair reaching the rule.
    Keeps upstream's in-place NaN write into its (private) distance rows; the library does not.
    """
    emb_start_idx = 0
    triplets = []
    pdists = upstream_pairwise_dists(embeddings, pdist_dtype)
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
    start = time.perf_counter()
    port32_candidates = {}
    port_triplets = upstream_pick_triplets(emb, sizes, ALPHA, candidates=port32_candidates)
    port_seconds = time.perf_counter() - start

    pick_triplets(emb, sizes, ALPHA, rng=0)                     # warm-up (BLAS threads, page faults)
    ours_seconds = []
    for rep in range(repeats):
        start = time.perf_counter()
        ours = pick_triplets(emb, sizes, ALPHA, rng=rep)
        ours_seconds.append(time.perf_counter() - start)

    port64_candidates = {}
    start = time.perf_counter()
    upstream_pick_triplets(emb, sizes, ALPHA, pdist_dtype=np.float64, candidates=port64_candidates)
    port64_seconds = time.perf_counter() - start
    exact = semi_hard_candidates(emb, sizes, ALPHA)
    exact_nonempty = {k: v for k, v in exact.items() if v.size}
    port64_nonempty = {k: v for k, v in port64_candidates.items() if v.size}
    same = (exact_nonempty.keys() == port64_nonempty.keys()
            and all(np.array_equal(exact_nonempty[k], port64_nonempty[k]) for k in exact_nonempty))
    triplet_pairs_ok = {(a, p) for a, p, _ in ours} == set(exact_nonempty) and all(
        n in set(exact[(a, p)].tolist()) for a, p, n in ours)
    best = min(ours_seconds)
    return {
        "scenario": name,
        "noise_std": noise,
        "pairs": len(exact),
        "pairs_with_candidates": len(exact_nonempty),
        "candidates_total": int(sum(v.size for v in exact.values())),
        "triplets_ours": len(ours),
        "triplets_port": len(port_triplets),
        "port_float32_seconds": round(port_seconds, 3),
        "port_float64_seconds": round(port64_seconds, 3),
        "ours_seconds_best": round(best, 4),
        "ours_seconds_all": [round(s, 4) for s in ours_seconds],
        "speedup_vs_port_float32": round(port_seconds / best, 1),
        "speedup_vs_port_float64": round(port64_seconds / best, 1),
        "same_candidate_sets_as_port_float64": bool(same),
        "ours_triplets_valid": bool(triplet_pairs_ok),
        "port_float32_candidate_diffs": count_candidate_diffs(exact_nonempty, port32_candidates),
        "images_per_second_ours": round(BAG_SIZE / best, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results", help="directory for triplet_mining.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of pick_triplets per scenario")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    results = []
    for name in args.scenarios.split(","):
        result = run_scenario(name, SCENARIOS[name], args.repeats)
        print(json.dumps(result))
        results.append(result)
    report = {
        "benchmark": "triplet_mining",
        "bag_size": BAG_SIZE, "images_per_identity": IMAGES_PER_IDENTITY, "emb_size": EMB_SIZE, "alpha": ALPHA,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "results": results,
    }
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "triplet_mining.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
