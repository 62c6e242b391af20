"""pick_triplets / semi_hard_candidates against a brute-force enumeration of insightface's rule."""
import itertools

import numpy as np
import pytest

import iterators.triplet_mining as triplet_mining
from benchmarks.bench_triplet_mining import upstream_pairwise_dists, upstream_pick_triplets
from iterators import pick_triplets
from iterators.triplet_mining import class_pairs, semi_hard_candidates


def brute_force_candidates(emb, sizes, alpha, max_ap=0.0):
    """{(a, p): set of n} by direct enumeration of every triple, float64 differences."""
    emb = np.asarray(emb, dtype=np.float64)
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    result = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        for a, p in itertools.combinations(range(start, end), 2):
            pos = float(np.sum((emb[a] - emb[p]) ** 2))
            cands = set()
            if not (max_ap > 0 and pos > max_ap):
                for n in range(len(emb)):
                    if start <= n < end:
                        continue
                    neg = float(np.sum((emb[a] - emb[n]) ** 2))
                    if neg - pos < alpha and pos < neg:
                        cands.add(n)
            result[(a, p)] = cands
    return result


def normalised(rng, n, dim):
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng, sizes, dim, noise):
    centres = rng.standard_normal((len(sizes), dim))
    x = np.repeat(centres, sizes, axis=0) + noise * rng.standard_normal((int(sum(sizes)), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


SIZES = [1, 2, 3, 5, 4, 1, 6, 0, 5, 3]


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("max_ap", [0.0, 0.8])
def test_candidate_sets_equal_brute_force(alpha, max_ap):
    rng = np.random.default_rng(7)
    emb = clustered(rng, SIZES, 6, 0.8)
    expected = brute_force_candidates(emb, SIZES, alpha, max_ap)
    got = semi_hard_candidates(emb, SIZES, alpha, max_ap)
    assert got.keys() == expected.keys()
    for key, cands in expected.items():
        assert set(got[key].tolist()) == cands, key


@pytest.fixture(params=[0, triplet_mining.REJECTION_DRAWS], ids=["scan-only", "draws-then-scan"])
def draws(request, monkeypatch):
    """Run a test with and without the rejection-sampling step of pick_triplets."""
    monkeypatch.setattr(triplet_mining, "REJECTION_DRAWS", request.param)
    return request.param


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 5.0])
def test_triplets_follow_rule_one_per_pair_with_candidates(alpha, draws):
    rng = np.random.default_rng(3)
    emb = clustered(rng, SIZES, 8, 0.9).astype(np.float32)
    expected = brute_force_candidates(emb, SIZES, alpha)
    triplets = pick_triplets(emb, SIZES, alpha, rng=11)
    pairs = [(a, p) for a, p, _ in triplets]
    assert len(pairs) == len(set(pairs)), "a pair yielded more than one triplet"
    assert set(pairs) == {k for k, v in expected.items() if v}
    for a, p, n in triplets:
        assert n in expected[(a, p)]
        pos = np.sum((emb[a].astype(np.float64) - emb[p]) ** 2)
        neg = np.sum((emb[a].astype(np.float64) - emb[n]) ** 2)
        assert neg - pos < alpha and pos < neg
    assert all(isinstance(i, int) for t in triplets for i in t)
    if alpha == 0.0:
        assert triplets == []


def test_random_embeddings_no_structure_matches_brute_force():
    rng = np.random.default_rng(0)
    sizes = [4] * 10
    emb = normalised(rng, 40, 3)
    expected = brute_force_candidates(emb, sizes, 0.4)
    triplets = pick_triplets(emb, sizes, 0.4, rng=0)
    assert {(a, p) for a, p, _ in triplets} == {k for k, v in expected.items() if v}
    assert all(n in expected[(a, p)] for a, p, n in triplets)


def test_max_ap_skips_far_positive_pairs(draws):
    rng = np.random.default_rng(5)
    sizes = [5] * 8
    emb = clustered(rng, sizes, 4, 1.0)
    all_pos = {(a, p): np.sum((emb[a] - emb[p]) ** 2) for a, p in zip(*class_pairs(sizes)[:2])}
    max_ap = float(np.median(list(all_pos.values())))
    triplets = pick_triplets(emb, sizes, 2.0, max_ap=max_ap, rng=1)
    assert triplets, "test needs some triplets"
    assert all(all_pos[(a, p)] <= max_ap for a, p, _ in triplets)
    without_cut = pick_triplets(emb, sizes, 2.0, rng=1)
    assert any(all_pos[(a, p)] > max_ap for a, p, _ in without_cut)
    expected = brute_force_candidates(emb, sizes, 2.0, max_ap)
    assert {(a, p) for a, p, _ in triplets} == {k for k, v in expected.items() if v}


def test_seeded_determinism_and_shuffle():
    rng = np.random.default_rng(9)
    sizes = [5] * 12
    emb = clustered(rng, sizes, 4, 1.5)
    first = pick_triplets(emb, sizes, 1.0, rng=42)
    assert len(first) > 20
    assert pick_triplets(emb, sizes, 1.0, rng=42) == first
    assert pick_triplets(emb, sizes, 1.0, rng=np.random.default_rng(42)) == first
    other = pick_triplets(emb, sizes, 1.0, rng=43)
    assert other != first
    # The output is shuffled, not in upstream's loop order (class, anchor, positive).
    assert first != sorted(first)
    # rng=None draws fresh entropy: still a valid selection of the same pairs.
    fresh = pick_triplets(emb, sizes, 1.0)
    assert {t[:2] for t in fresh} == {t[:2] for t in first}


def test_negative_drawn_uniformly_among_candidates(draws):
    # One class of 2 (a=0, p=1) at distance^2 0.5; four negatives at distance^2 0.6..0.75 are
    # candidates for alpha 0.3, two far ones are not.
    def point(d2):
        # unit vector at squared distance d2 from (1, 0): cos = 1 - d2/2
        c = 1 - d2 / 2
        return [c, np.sqrt(1 - c * c)]
    emb = np.array([point(0.0), point(0.5), point(0.6), point(0.65), point(0.7), point(0.75),
                    point(1.5), point(1.9)])
    sizes = [2, 1, 1, 1, 1, 1, 1]
    assert semi_hard_candidates(emb, sizes, 0.3)[(0, 1)].tolist() == [2, 3, 4, 5]
    draws = np.array([pick_triplets(emb, sizes, 0.3, rng=seed)[0][2] for seed in range(800)])
    freq = np.bincount(draws, minlength=8)
    assert freq[[0, 1, 6, 7]].sum() == 0
    # Each of the 4 candidates ~ 200 draws; 4 sigma of a binomial(800, 1/4) is ~49.
    assert np.all(np.abs(freq[2:6] - 200) < 50), freq


def test_inputs_not_modified():
    rng = np.random.default_rng(1)
    sizes = [3, 4, 5]
    for dtype in (np.float32, np.float64):
        emb = normalised(rng, 12, 5).astype(dtype)
        before = emb.copy()
        pick_triplets(emb, sizes, 0.5, rng=0)
        semi_hard_candidates(emb, sizes, 0.5)
        np.testing.assert_array_equal(emb, before)


def test_chunking_does_not_change_result(monkeypatch):
    rng = np.random.default_rng(4)
    sizes = [5, 3, 5, 2, 5, 4]
    emb = clustered(rng, sizes, 4, 1.2)
    reference = semi_hard_candidates(emb, sizes, 0.6)
    reference_triplets = pick_triplets(emb, sizes, 0.6, rng=3)
    # Chunks of 1 and 3 pairs split anchors with several positives across chunks.
    for elements in (1, 3 * len(emb)):
        monkeypatch.setattr(triplet_mining, "CHUNK_ELEMENTS", elements)
        got = semi_hard_candidates(emb, sizes, 0.6)
        assert got.keys() == reference.keys()
        assert all(np.array_equal(got[k], reference[k]) for k in reference)
        assert {t[:2] for t in pick_triplets(emb, sizes, 0.6, rng=3)} == {t[:2] for t in reference_triplets}


def test_boundary_cases_decided_in_float64():
    # Negatives whose d(a,n) - d(a,p) lies within 1e-9 of alpha or of 0: far inside float32
    # rounding, so only the exact (float64) path can decide them as the brute force does.
    def point(d2):
        c = 1 - d2 / 2
        return [c, np.sqrt(1 - c * c), 0.0]
    pos, alpha = 0.4, 0.3
    offsets = [-1e-9, 1e-9, -3e-10, 3e-10]
    negs = [pos + alpha + o for o in offsets] + [pos + o for o in offsets]
    emb = np.array([point(0.0), point(pos)] + [point(d) for d in negs])
    sizes = [2] + [1] * len(negs)
    expected = brute_force_candidates(emb, sizes, alpha)[(0, 1)]
    assert 0 < len(expected) < len(negs)
    assert set(semi_hard_candidates(emb, sizes, alpha)[(0, 1)].tolist()) == expected


def test_matches_upstream_port_on_small_bag():
    rng = np.random.default_rng(8)
    sizes = [5] * 20
    emb = clustered(rng, sizes, 16, 1.3)
    port = {}
    upstream_pick_triplets(emb, sizes, 0.3, pdists=upstream_pairwise_dists(emb, np.float64), candidates=port)
    ours = semi_hard_candidates(emb, sizes, 0.3)
    assert ours.keys() == port.keys()
    assert all(np.array_equal(ours[k], port[k]) for k in ours)


@pytest.mark.parametrize("shape", [(5, 16), (3, 13), (1, 8), (0, 8)])
def test_sparse_nonzero_equals_numpy(shape):
    rng = np.random.default_rng(0)
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random(shape) < density
        got = triplet_mining._nonzero(mask)
        expected = np.nonzero(mask)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_degenerate_bags():
    rng = np.random.default_rng(0)
    assert pick_triplets(normalised(rng, 4, 3), [1, 1, 1, 1], 0.3, rng=0) == []
    assert pick_triplets(np.zeros((0, 3)), [], 0.3, rng=0) == []
    # A single class has no negatives at all.
    assert pick_triplets(normalised(rng, 5, 3), [5], 4.0, rng=0) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(embeddings=np.zeros(5), nrof_images_per_class=[5]), "2-D"),
    (dict(embeddings=np.zeros((5, 2)), nrof_images_per_class=[2, 2]), "sums to 4 but there are 5"),
    (dict(embeddings=np.full((2, 2), np.nan), nrof_images_per_class=[2]), "NaN"),
    (dict(embeddings=np.zeros((2, 2)), nrof_images_per_class=[3, -1]), "negative"),
    (dict(embeddings=np.zeros((2, 2)), nrof_images_per_class=[1.5, 0.5]), "integers"),
    (dict(embeddings=np.zeros((2, 2)), nrof_images_per_class=[2], alpha=-0.1), "alpha"),
    (dict(embeddings=np.zeros((2, 2)), nrof_images_per_class=[2], max_ap=-1.0), "max_ap"),
])
def test_bad_input_raises(kwargs, match):
    kwargs.setdefault("alpha", 0.3)
    with pytest.raises(ValueError, match=match):
        pick_triplets(**kwargs)


def test_bad_rng_type():
    with pytest.raises(TypeError, match="rng"):
        pick_triplets(np.zeros((2, 2)), [2], 0.3, rng="seed")


def test_rng_accepts_what_check_random_state_accepts_plus_generator():
    """rng: None, int, np.random.RandomState (scikit-learn's check_random_state) or np.random.Generator."""
    rng = np.random.default_rng(4)
    sizes = [5] * 10
    emb = clustered(rng, sizes, 4, 1.5)
    pairs = {k for k, v in brute_force_candidates(emb, sizes, 1.0).items() if v}
    candidates = brute_force_candidates(emb, sizes, 1.0)
    runs = {
        "None": (lambda: None, lambda: None),
        "int": (lambda: 7, lambda: np.int64(7)),
        "RandomState": (lambda: np.random.RandomState(7), lambda: np.random.RandomState(7)),
        "Generator": (lambda: np.random.default_rng(7), lambda: np.random.default_rng(7)),
    }
    results = {}
    for name, (make_a, make_b) in runs.items():
        first = pick_triplets(emb, sizes, 1.0, rng=make_a())
        second = pick_triplets(emb, sizes, 1.0, rng=make_b())
        for triplets in (first, second):  # always a valid selection: one triplet per pair with candidates
            assert {t[:2] for t in triplets} == pairs
            assert all(n in candidates[(a, p)] for a, p, n in triplets)
        if name != "None":
            assert first == second, f"equal {name} seeds gave different triplets"
        results[name] = first
    assert results["int"] == results["Generator"]  # an int seeds default_rng
    assert results["RandomState"] != results["Generator"]  # its own stream
    assert pick_triplets(emb, sizes, 1.0, rng=np.random.RandomState(8)) != results["RandomState"]
    # A RandomState is advanced, as scikit-learn's users expect: two calls on one state differ.
    state = np.random.RandomState(7)
    assert pick_triplets(emb, sizes, 1.0, rng=state) == results["RandomState"]
    assert pick_triplets(emb, sizes, 1.0, rng=state) != results["RandomState"]
