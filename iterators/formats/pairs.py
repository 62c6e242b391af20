"""Balanced genuine/impostor pair sampling for verification packs (`.bin`).

insightface evaluates a pack with a *contiguous* 10-fold split (insightface ``src/eval/verification.py`` ``calculate_roc`` with ``LFold``, commit 9fc3cc9c): fold f is pairs
``[f*n/k, (f+1)*n/k)``. LFW's ``pairs.txt`` is laid out to match: 10 sets, each with 300 matched
pairs followed by 300 mismatched pairs, and the people of different sets are disjoint. ``sample_pairs``
reproduces that layout for any labelled image collection:

* ``num_pairs`` is split into ``nfolds`` contiguous folds of ``num_pairs / nfolds`` pairs;
* each fold holds ``q = num_pairs / (2 * nfolds)`` genuine pairs followed by ``q`` impostor pairs
  (so every fold is exactly balanced, as LFW's sets are);
* no pair (unordered) occurs twice in the pack, and a pair never pairs an image with itself;
* identity-disjoint folds (like LFW's sets) when ``identity_disjoint`` allows it and the data can
  supply every fold from its own identities; otherwise all folds draw from all identities;
* genuine pairs are weighted so every identity is equally likely (then two of its images), so
  large identities do not dominate; impostor pairs likewise weight every identity pair equally
  (then one image of each);
* everything is drawn from ``np.random.default_rng(seed)``: the same inputs and seed give the same pairs.
"""
import heapq
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

# Below this many candidate pairs we enumerate them all and draw without replacement (exact, no
# retries); above it we draw by rejection, which is cheap because we then need a small fraction.
_ENUMERATE_LIMIT = 200_000


def _group_by_label(labels):
    """Return a list of index arrays, one per distinct label (sorted label order)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"sample_pairs: labels must be one label per image (1-D), got shape {arr.shape}")
    _, inverse = np.unique(arr, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    return np.split(order, np.cumsum(counts)[:-1])


def _genuine_capacity(groups):
    return sum(len(g) * (len(g) - 1) // 2 for g in groups)


def _impostor_capacity(groups):
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    total = int(sizes.sum())
    return (total * total - int((sizes * sizes).sum())) // 2


def _canon(i, j):
    return (int(i), int(j)) if i < j else (int(j), int(i))


def _enumerate_genuine(groups):
    """All genuine pairs, each weighted so that every identity carries the same total weight.

    Identities of equal size are stacked into one (k, n) matrix and share one ``triu_indices``, so
    the cost is O(#distinct sizes + #pairs) Python work, not a loop over identities.
    """
    by_size = {}
    for g in groups:
        if len(g) >= 2:
            by_size.setdefault(len(g), []).append(g)
    pairs, weights = [], []
    for n in sorted(by_size):
        block = np.stack(by_size[n])
        a, b = np.triu_indices(n, k=1)
        pairs.extend(zip(block[:, a].ravel().tolist(), block[:, b].ravel().tolist()))
        weights.append(np.full(block.shape[0] * len(a), 1.0 / len(a)))
    return pairs, np.concatenate(weights) if weights else np.zeros(0)


def _enumerate_impostor(groups):
    """All impostor pairs, weighted so that every identity pair carries the same total weight.

    One vectorised block per identity (its images x the images of all later identities), so the
    cost is O(#identities + #pairs) rather than a Python loop over identity pairs.
    """
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    flat = np.concatenate(groups)
    owner_size = np.repeat(sizes, sizes).astype(np.float64)  # size of the identity of flat[k]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pairs, weights = [], []
    for x, g in enumerate(groups[:-1]):
        later = flat[starts[x + 1]:]
        a = np.repeat(g, len(later))
        b = np.tile(later, len(g))
        pairs.extend(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
        weights.append(np.tile(1.0 / (len(g) * owner_size[starts[x + 1]:]), len(g)))
    return pairs, np.concatenate(weights) if weights else np.zeros(0)


def _draw_enumerated(pairs, weights, count, rng):
    p = weights / weights.sum()
    chosen = rng.choice(len(pairs), size=count, replace=False, p=p)
    return [pairs[k] for k in chosen]


def _draw_genuine_rejection(groups, count, used, rng):
    eligible = [g for g in groups if len(g) >= 2]
    out = []
    attempts, max_attempts = 0, 50 * count + 1000
    while len(out) < count:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"sample_pairs: could not draw {count} distinct genuine pairs "
                               f"after {max_attempts} attempts")
        g = eligible[rng.integers(len(eligible))]
        i, j = rng.choice(len(g), size=2, replace=False)
        pair = _canon(g[i], g[j])
        if pair not in used:
            used.add(pair)
            out.append(pair)
    return out


def _draw_impostor_rejection(groups, count, used, rng):
    out = []
    attempts, max_attempts = 0, 50 * count + 1000
    while len(out) < count:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"sample_pairs: could not draw {count} distinct impostor pairs "
                               f"after {max_attempts} attempts")
        x, y = rng.choice(len(groups), size=2, replace=False)
        i = groups[x][rng.integers(len(groups[x]))]
        j = groups[y][rng.integers(len(groups[y]))]
        pair = _canon(i, j)
        if pair not in used:
            used.add(pair)
            out.append(pair)
    return out


def _draw(groups, count, kind, rng):
    """Draw ``count`` distinct pairs of ``kind`` ('genuine' | 'impostor') from ``groups``."""
    if count == 0:
        return []
    capacity = _genuine_capacity(groups) if kind == "genuine" else _impostor_capacity(groups)
    if capacity <= _ENUMERATE_LIMIT or count * 4 > capacity:
        enum = _enumerate_genuine if kind == "genuine" else _enumerate_impostor
        pairs, weights = enum(groups)
        return _draw_enumerated(pairs, weights, count, rng)
    draw = _draw_genuine_rejection if kind == "genuine" else _draw_impostor_rejection
    return draw(groups, count, set(), rng)


def _split_identities(groups, nfolds, per_fold, rng):
    """Deal identities to ``nfolds`` groups; return them if every group can supply its fold, else None."""
    order = rng.permutation(len(groups))
    # Deal the largest identities first, each to the fold with the fewest images so far (greedy
    # balancing); the permutation breaks ties randomly.
    order = sorted(order.tolist(), key=lambda k: -len(groups[k]))
    folds = [[] for _ in range(nfolds)]
    heap = [(0, f) for f in range(nfolds)]  # (images so far, fold): lowest fold index wins ties
    for k in order:
        size, f = heapq.heappop(heap)
        folds[f].append(groups[k])
        heapq.heappush(heap, (size + len(groups[k]), f))
    for f in folds:
        if _genuine_capacity(f) < per_fold or _impostor_capacity(f) < per_fold:
            return None
    return folds


def sample_pairs(labels, num_pairs, nfolds=10, seed=0, identity_disjoint="auto"):
    """Sample a balanced verification pair list laid out in contiguous folds (LFW layout).

    Parameters
    ----------
    labels : sequence, length M
        Identity label of each image (any sortable hashable values: ints, floats, strings).
    num_pairs : int
        Total pairs N; must be a positive multiple of ``2 * nfolds``.
    nfolds : int
        Number of contiguous folds (insightface evaluates with 10).
    seed : int
        Seed of ``np.random.default_rng``; same inputs + seed -> same output.
    identity_disjoint : {'auto', True, False}
        True: every fold uses its own identities (as LFW's 10 sets); raises if the data cannot
        supply that. False: all folds draw from all identities. 'auto': disjoint when possible,
        otherwise shared (logged at INFO).

    Returns
    -------
    pairs : list of (int, int), length N
        Indices into ``labels`` with ``i < j``. Fold f = ``pairs[f*N/k:(f+1)*N/k]``; within a fold,
        the first half are genuine (``labels[i] == labels[j]``) and the second half impostor.
    issame : list of bool, length N
        ``labels[i] == labels[j]`` for each pair.

    Raises
    ------
    ValueError
        ``num_pairs`` not a positive multiple of ``2 * nfolds``; too few identities with >= 2
        images for the genuine pairs, or fewer than 2 identities for impostor pairs; more pairs
        requested than distinct pairs exist.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs <= 0:
        raise ValueError(f"sample_pairs: num_pairs must be a positive integer, got {num_pairs!r}")
    if isinstance(nfolds, bool) or not isinstance(nfolds, (int, np.integer)) or nfolds <= 0:
        raise ValueError(f"sample_pairs: nfolds must be a positive integer, got {nfolds!r}")
    if identity_disjoint not in ("auto", True, False):
        raise ValueError(f"sample_pairs: identity_disjoint must be 'auto', True or False, got {identity_disjoint!r}")
    if num_pairs % (2 * nfolds):
        lower = num_pairs - num_pairs % (2 * nfolds)
        raise ValueError(
            f"sample_pairs: num_pairs={num_pairs} is not divisible by 2*nfolds={2 * nfolds} (each of the "
            f"{nfolds} folds needs as many genuine as impostor pairs); use e.g. {lower or 2 * nfolds} "
            f"or {lower + 2 * nfolds}")
    groups = _group_by_label(labels)
    per_fold = num_pairs // (2 * nfolds)
    half = num_pairs // 2
    sizes = [len(g) for g in groups]
    genuine_ids = sum(1 for s in sizes if s >= 2)
    if genuine_ids == 0:
        raise ValueError(
            f"sample_pairs: genuine pairs need an identity with >= 2 images, but all {len(groups)} "
            f"identities among {len(sizes) and sum(sizes)} images have a single image")
    if len(groups) < 2:
        raise ValueError("sample_pairs: impostor pairs need >= 2 identities, but all images share one label")
    gen_cap, imp_cap = _genuine_capacity(groups), _impostor_capacity(groups)
    if gen_cap < half:
        raise ValueError(
            f"sample_pairs: {half} genuine pairs requested but the {genuine_ids} identities with >= 2 "
            f"images only form {gen_cap} distinct genuine pairs; lower num_pairs to at most "
            f"{2 * nfolds * (gen_cap // nfolds)} or add images")
    if imp_cap < half:
        raise ValueError(
            f"sample_pairs: {half} impostor pairs requested but only {imp_cap} distinct impostor pairs "
            f"exist; lower num_pairs or add identities")

    rng = np.random.default_rng(seed)
    fold_groups = None
    if identity_disjoint is not False:
        fold_groups = _split_identities(groups, nfolds, per_fold, rng)
        if fold_groups is None:
            if identity_disjoint is True:
                raise ValueError(
                    f"sample_pairs: cannot give each of the {nfolds} folds its own identities with "
                    f"{per_fold} genuine and {per_fold} impostor pairs from {len(groups)} identities; "
                    "use identity_disjoint=False or fewer pairs/folds")
            logger.info("sample_pairs: %d identities cannot fill %d identity-disjoint folds; "
                        "folds share identities", len(groups), nfolds)

    pairs, issame = [], []
    if fold_groups is not None:
        for fg in fold_groups:
            pairs += _draw(fg, per_fold, "genuine", rng)
            pairs += _draw(fg, per_fold, "impostor", rng)
            issame += [True] * per_fold + [False] * per_fold
    else:
        genuine = _draw(groups, half, "genuine", rng)
        impostor = _draw(groups, half, "impostor", rng)
        genuine = [genuine[k] for k in rng.permutation(half)]
        impostor = [impostor[k] for k in rng.permutation(half)]
        for f in range(nfolds):
            pairs += genuine[f * per_fold:(f + 1) * per_fold]
            pairs += impostor[f * per_fold:(f + 1) * per_fold]
            issame += [True] * per_fold + [False] * per_fold
    logger.debug("sample_pairs: %d pairs in %d folds (%s identities)", len(pairs), nfolds,
                 "disjoint" if fold_groups is not None else "shared")
    return pairs, issame


def fold_slices(num_pairs, nfolds=10):
    """Contiguous fold boundaries as insightface's ``LFold``/``KFold(shuffle=False)`` makes them.

    The first ``num_pairs % nfolds`` folds hold one extra pair. Returns a list of ``slice`` objects.
    """
    if nfolds <= 0 or num_pairs < nfolds:
        raise ValueError(f"fold_slices: need num_pairs >= nfolds >= 1, got num_pairs={num_pairs}, nfolds={nfolds}")
    base, extra = divmod(num_pairs, nfolds)
    out, start = [], 0
    for f in range(nfolds):
        stop = start + base + (1 if f < extra else 0)
        out.append(slice(start, stop))
        start = stop
    return out


def read_lfw_pairs(path, data_dir, ext="jpg"):
    """Parse LFW ``pairs.txt`` into ``([(path1, path2)], [issame])`` (file order).

    Lines are read as lists of fields (upstream built a ragged ``np.array`` that numpy >= 1.24
    refuses). The first line is the ``<sets> <pairs per set>`` header and is skipped.

    Raises
    ------
    ValueError
        A line without 3 or 4 fields, or with a non-integer image number (message quotes the line).
    """
    pairs, issame = [], []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) == 3:
                name, a, b = fields
                item = ((name, int(a)), (name, int(b)), True)
            elif len(fields) == 4:
                n1, a, n2, b = fields
                item = ((n1, int(a)), (n2, int(b)), False)
            else:
                raise ValueError(f"{len(fields)} fields")
        except ValueError as exc:
            raise ValueError(f"{path} line {lineno}: {line!r}: expected 'name i j' (same person) or "
                             f"'name1 i name2 j' (different people) ({exc})") from None
        (p, i), (q, j), same = item
        pairs.append((os.path.join(data_dir, p, f"{p}_{i:04d}.{ext}"), os.path.join(data_dir, q, f"{q}_{j:04d}.{ext}")))
        issame.append(same)
    return pairs, issame


def read_label_pairs(path, data_dir):
    """Parse ``pairs_label.txt`` lines ``path1 path2 0|1`` into ``([(path1, path2)], [issame])``."""
    pairs, issame = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or fields[2] not in ("0", "1"):
                raise ValueError(f"{path} line {lineno}: {line.strip()!r}: expected 'path1 path2 0|1'")
            pairs.append((os.path.join(data_dir, fields[0]), os.path.join(data_dir, fields[1])))
            issame.append(fields[2] == "1")
    return pairs, issame


__all__ = ["sample_pairs", "fold_slices", "read_lfw_pairs", "read_label_pairs"]
