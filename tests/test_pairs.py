"""iterators.formats.pairs.sample_pairs: balanced contiguous folds, no duplicates, seeded, clear errors."""
import numpy as np
import pytest

from iterators.formats.pairs import fold_slices, sample_pairs


def _check_layout(labels, pairs, issame, num_pairs, nfolds):
    labels = np.asarray(labels)
    assert len(pairs) == len(issame) == num_pairs
    # issame is the truth for each pair (independent recomputation from labels)
    for (i, j), same in zip(pairs, issame):
        assert i != j
        assert i < j
        assert (labels[i] == labels[j]) == same
    assert len({tuple(p) for p in pairs}) == num_pairs, "duplicate pair"
    q = num_pairs // (2 * nfolds)
    for f in range(nfolds):
        fold = issame[f * 2 * q:(f + 1) * 2 * q]
        assert fold == [True] * q + [False] * q


def test_orl_like_layout_and_identity_disjoint_folds():
    labels = np.repeat(np.arange(40), 10)
    pairs, issame = sample_pairs(labels, 600, nfolds=10, seed=3)
    _check_layout(labels, pairs, issame, 600, 10)
    ids_per_fold = [{labels[i] for p in pairs[f * 60:(f + 1) * 60] for i in p} for f in range(10)]
    for a in range(10):
        for b in range(a + 1, 10):
            assert not ids_per_fold[a] & ids_per_fold[b]


def test_small_set_falls_back_to_shared_identities():
    labels = np.repeat(np.arange(3), 5)  # 3 identities cannot fill 10 disjoint folds
    pairs, issame = sample_pairs(labels, 20, nfolds=10, seed=0)
    _check_layout(labels, pairs, issame, 20, 10)
    with pytest.raises(ValueError, match="identity_disjoint=False"):
        sample_pairs(labels, 20, nfolds=10, identity_disjoint=True)


def test_seeded_and_string_labels():
    labels = [f"person_{k % 7}" for k in range(70)]
    a = sample_pairs(labels, 40, nfolds=5, seed=11)
    b = sample_pairs(labels, 40, nfolds=5, seed=11)
    c = sample_pairs(labels, 40, nfolds=5, seed=12)
    assert a == b
    assert a != c
    _check_layout(labels, *a, 40, 5)


def test_all_distinct_pairs_can_be_used_exactly():
    # 4 identities x 2 images: 4 genuine pairs exist, 24 impostor pairs
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    pairs, issame = sample_pairs(labels, 8, nfolds=2, seed=0, identity_disjoint=False)
    _check_layout(labels, pairs, issame, 8, 2)
    genuine = {p for p, s in zip(pairs, issame) if s}
    assert genuine == {(0, 1), (2, 3), (4, 5), (6, 7)}


def _count_calls(monkeypatch, module, names):
    calls = {name: 0 for name in names}
    for name in names:
        original = getattr(module, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
    return calls


def test_large_identity_set_uses_rejection_path(monkeypatch):
    from iterators.formats import pairs as pairs_module
    calls = _count_calls(monkeypatch, pairs_module, ["_draw_genuine_rejection", "_draw_impostor_rejection",
                                                     "_enumerate_genuine", "_enumerate_impostor"])
    labels = np.repeat(np.arange(2000), 20)  # 380k genuine pairs > enumeration limit
    assert pairs_module._genuine_capacity(pairs_module._group_by_label(labels)) > pairs_module._ENUMERATE_LIMIT
    pairs, issame = sample_pairs(labels, 200, nfolds=10, seed=0, identity_disjoint=False)
    _check_layout(labels, pairs, issame, 200, 10)
    # the rejection samplers drew every pair; nothing was enumerated
    assert calls == {"_draw_genuine_rejection": 1, "_draw_impostor_rejection": 1,
                     "_enumerate_genuine": 0, "_enumerate_impostor": 0}


def test_small_identity_set_uses_enumeration_path(monkeypatch):
    from iterators.formats import pairs as pairs_module
    calls = _count_calls(monkeypatch, pairs_module, ["_draw_genuine_rejection", "_draw_impostor_rejection",
                                                     "_enumerate_genuine", "_enumerate_impostor"])
    labels = np.repeat(np.arange(40), 10)
    sample_pairs(labels, 200, nfolds=10, seed=0, identity_disjoint=False)
    assert calls == {"_draw_genuine_rejection": 0, "_draw_impostor_rejection": 0,
                     "_enumerate_genuine": 1, "_enumerate_impostor": 1}


@pytest.mark.parametrize("labels,num_pairs,nfolds,match", [
    (np.repeat(np.arange(5), 4), 30, 10, "not divisible by 2\\*nfolds=20"),
    (np.repeat(np.arange(5), 4), 0, 10, "positive integer"),
    (np.repeat(np.arange(5), 4), 20, 0, "nfolds must be a positive integer"),
    (np.arange(10), 20, 10, "single image"),
    (np.zeros(10, dtype=int), 20, 10, ">= 2 identities"),
    ([0, 0, 1, 1, 2, 2], 20, 10, "only form 3 distinct genuine pairs"),
])
def test_errors(labels, num_pairs, nfolds, match):
    with pytest.raises(ValueError, match=match):
        sample_pairs(labels, num_pairs, nfolds=nfolds)


def test_fold_slices_match_sklearn_kfold():
    from sklearn.model_selection import KFold
    for n, k in [(600, 10), (23, 10), (10, 10), (7, 3)]:
        ours = [np.arange(n)[s] for s in fold_slices(n, k)]
        theirs = [test for _, test in KFold(n_splits=k, shuffle=False).split(np.arange(n))]
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        fold_slices(5, 10)


def test_genuine_pairs_weight_identities_not_pairs():
    # One identity with 50 images (1225 genuine pairs) and nine with 5 (10 each): drawing pairs
    # uniformly would give the big identity ~93% of the genuine pairs; weighting identities equally
    # gives it about its 1/10 share (a little more as the small ones are used up).
    labels = [0] * 50 + [k for k in range(1, 10) for _ in range(5)]
    pairs, issame = sample_pairs(labels, 80, nfolds=2, seed=0, identity_disjoint=False)
    big = sum(1 for (i, j), s in zip(pairs, issame) if s and labels[i] == 0)
    assert big < 12
    assert len({labels[i] for (i, j), s in zip(pairs, issame) if s}) == 10
