"""FaceNet semi-hard triplet selection for insightface's triplet training.

insightface's ``FaceImageIter.pick_triplets`` (``recognition/arcface_mxnet/triplet_image_iter.py``)
walks every (anchor, positive) pair of every class in Python and, for each pair, scans a full row of
squared distances for semi-hard negatives. The functions here apply exactly the same rule with numpy
on chunks of many pairs at once:

* distances are squared Euclidean, ``d(i, j) = ||e_i - e_j||^2`` (in [0, 4] for L2-normalised rows);
* for every pair ``a < p`` inside one class block, the candidate negatives are the images ``n``
  outside the block with

  .. math:: d(a, n) - d(a, p) < \\alpha \\quad\\text{and}\\quad d(a, p) < d(a, n);

* a pair with ``max_ap > 0`` and ``d(a, p) > max_ap`` is skipped;
* every pair with at least one candidate yields one triplet whose negative is drawn uniformly
  among its candidates; the final list is shuffled.

Unlike upstream, the inputs are never modified: upstream aliases a row of its distance matrix
(``neg_dists_sqr = pdists[a_idx]``) and writes NaN into it in place (``pick_triplets``); here the
own-class entries are set to +inf in a private distance matrix instead.

How (per chunk of pairs, no Python loop over pairs or negatives):

1. one float32 matrix product gives the distance rows of the chunk's anchors to the whole bag; the
   anchor's own class block is set to +inf, so no rule can select it;
2. pairs whose nearest other-class image is already beyond ``d(a, p) + alpha`` are dropped (after
   pre-training, most pairs) at the cost of one minimum per row;
3. for the others, 32 uniform draws over the bag are tested first: the first candidate among
   them is a uniform draw from the candidate set (rejection sampling), which settles the pairs with
   many candidates (early in training) without scanning their rows;
4. the pairs left are scanned in full, their candidates listed and one drawn uniformly.

Precision: every decision is the one float64 arithmetic on the differences ``e_i - e_j`` gives.
Entries closer to a boundary than the float32 product's error bound are recomputed in float64
(:class:`_CandidateRule`). Upstream computes the negative distances in float32 (``mx.nd.array``'s
default dtype) and the positive one in float64, so it can differ from any exact rule within ~1e-6
of a boundary; ``benchmarks/bench_triplet_mining.py`` counts such cases.
"""
import logging

import numpy as np

logger = logging.getLogger(__name__)

# Upper bound on the number of (pair, image) entries held in one chunk of the candidate mask.
# 2**22 float32 values are 16 MiB; a few temporaries of that size keep the peak memory of mining a
# 7,200-image bag around 100 MiB while the matrix products stay large enough to run near BLAS speed.
CHUNK_ELEMENTS = 2 ** 22
# Uniform draws per (anchor, positive) pair tried before its whole row is scanned (rejection sampling).
# A pair whose candidates are a fraction f of the bag is settled with probability 1 - (1 - f)^32.
REJECTION_DRAWS = 32


class _RandomStateDraws:
    """The two ``Generator`` draws pick_triplets makes, taken from a legacy ``np.random.RandomState``.

    ``integers(0, high, size)`` is ``randint(0, high, size)`` (``high`` may be an array) and ``permutation``
    is ``RandomState.permutation``; the RandomState advances as scikit-learn's ``check_random_state`` users
    expect (equal seeds give equal triplets).
    """

    def __init__(self, random_state):
        self.random_state = random_state

    def integers(self, low, high, size=None):
        return self.random_state.randint(low, high, size=size, dtype=np.int64)

    def permutation(self, n):
        return self.random_state.permutation(n)


def _as_rng(rng):
    """What scikit-learn's ``check_random_state`` accepts (None, an int seed, a ``RandomState``) plus a
    ``np.random.Generator``, as an object with ``integers`` and ``permutation``.

    None draws fresh entropy and an int seeds ``np.random.default_rng`` (a Generator), so ``rng=42`` and
    ``rng=np.random.default_rng(42)`` give the same triplets; a ``RandomState`` is used as given (its own
    stream: ``RandomState(42)`` gives other triplets than ``default_rng(42)``, equal ones for equal seeds).
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, np.random.RandomState):
        return _RandomStateDraws(rng)
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"pick_triplets: rng must be None, an int seed, a numpy RandomState or a numpy Generator, "
                    f"got {type(rng).__name__}")


def _check_inputs(embeddings, nrof_images_per_class, alpha, max_ap):
    """Validate and convert the inputs of the mining functions.

    Returns
    -------
    emb : ndarray, float64, shape (N, D)
    sizes : ndarray, int64, shape (C,)
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"pick_triplets: embeddings must be a 2-D (N, D) array, got shape {emb.shape}")
    # float64 so that comparisons near the alpha boundary do not depend on how the distance was
    # summed (Gram form here, per-row differences in upstream's loop).
    emb = emb.astype(np.float64, copy=False)
    if not np.all(np.isfinite(emb)):
        raise ValueError("pick_triplets: embeddings contain NaN or inf; check the model output "
                         "(a diverged model cannot be mined)")
    sizes = np.asarray(nrof_images_per_class)
    if sizes.ndim != 1 or not (sizes.size == 0 or np.issubdtype(sizes.dtype, np.integer)
                               or (np.issubdtype(sizes.dtype, np.floating) and np.all(sizes == np.round(sizes)))):
        raise ValueError(f"pick_triplets: nrof_images_per_class must be a 1-D sequence of integers, "
                         f"got {nrof_images_per_class!r}")
    sizes = sizes.astype(np.int64)
    if np.any(sizes < 0):
        raise ValueError(f"pick_triplets: nrof_images_per_class has negative entries: {sizes[sizes < 0].tolist()}")
    if int(sizes.sum()) != emb.shape[0]:
        raise ValueError(f"pick_triplets: nrof_images_per_class sums to {int(sizes.sum())} but there are "
                         f"{emb.shape[0]} embeddings; the class blocks must cover the bag exactly")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"pick_triplets: alpha must be a finite number >= 0, got {alpha!r}")
    if not np.isfinite(max_ap) or max_ap < 0:
        raise ValueError(f"pick_triplets: max_ap must be >= 0 (0 disables the cut), got {max_ap!r}")
    return emb, sizes


def class_pairs(nrof_images_per_class):
    """Enumerate every (anchor, positive) pair ``a < p`` inside each class block.

    Parameters
    ----------
    nrof_images_per_class : sequence of int, length C
        Sizes of consecutive class blocks; class k covers rows ``[start_k, start_k + n_k)``.

    Returns
    -------
    anchors, positives, block_start, block_end : ndarray, int64, shape (P,)
        ``P = sum_k n_k (n_k - 1) / 2``; pairs ordered by class, then anchor, then positive
        (upstream's loop order). ``block_start/end`` delimit the pair's own class.
    """
    sizes = np.asarray(nrof_images_per_class, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])) if sizes.size else sizes
    anchors, positives, block_start, block_end = [], [], [], []
    # One small upper-triangle template per distinct class size (5 per identity -> one template),
    # so this is a loop over sizes, not over classes or pairs.
    for n in np.unique(sizes):
        if n < 2:
            continue
        local_a, local_p = np.triu_indices(int(n), k=1)
        class_starts = starts[sizes == n]
        anchors.append((class_starts[:, None] + local_a[None, :]).ravel())
        positives.append((class_starts[:, None] + local_p[None, :]).ravel())
        block_start.append(np.repeat(class_starts, local_a.size))
        block_end.append(np.repeat(class_starts + n, local_a.size))
    if not anchors:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy(), empty.copy()
    anchors, positives = np.concatenate(anchors), np.concatenate(positives)
    block_start, block_end = np.concatenate(block_start), np.concatenate(block_end)
    order = np.lexsort((positives, anchors))
    return anchors[order], positives[order], block_start[order], block_end[order]


def _own_class_entries(block_start, block_end):
    """Flat (row, column) indices of every pair's own class block, for masking in one assignment."""
    lengths = block_end - block_start
    rows = np.repeat(np.arange(lengths.size), lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, np.repeat(block_start, lengths) + offsets


def _nonzero(mask):
    """``np.nonzero`` of a 2-D boolean array, faster when few entries are set.

    Rows whose length is a multiple of 8 are scanned as 64-bit words first (8 flags per word), and
    only the words that are not zero are expanded. Same (row-major) order as ``np.nonzero``.
    """
    rows, cols = mask.shape
    if cols % 8 or not mask.flags.c_contiguous or mask.size == 0:
        return np.nonzero(mask)
    word_rows, word_cols = np.nonzero(mask.view(np.uint64))
    bits_row, bits_col = np.nonzero(mask.reshape(rows, cols // 8, 8)[word_rows, word_cols])
    return word_rows[bits_row], word_cols[bits_row] * 8 + bits_col


def _exact_sq_dists(emb, rows, cols):
    """``||emb[rows] - emb[cols]||^2`` in float64 from the differences (the reference definition)."""
    diff = emb[rows] - emb[cols]
    return np.einsum("ij,ij->i", diff, diff)


class _PairChunk:
    """Distances of a chunk of (anchor, positive) pairs to the whole bag, shared by the deciders below.

    ``dists`` (U, N) float32 holds ``d(a, n)`` for the U distinct anchors of the chunk (row
    ``row_of_pair[k]`` for pair k), with +inf in the anchor's own class block so that no rule can
    ever select it; ``nearest`` (U,) is each row's smallest distance to another class; ``pos`` (K,)
    float64 holds the exact ``d(a, p)``.
    """

    def __init__(self, emb, emb32, sq_norms32, anchors, positives, block_start, block_end):
        self.anchors, self.positives = anchors, positives
        self.pos = _exact_sq_dists(emb, anchors, positives)
        self.pos32 = self.pos.astype(np.float32)
        # Each anchor has up to n-1 positives: its distance row is computed once and shared.
        unique_a, first, self.row_of_pair = np.unique(anchors, return_index=True, return_inverse=True)
        self.dists = emb32[unique_a] @ emb32.T
        self.dists *= -2.0
        self.dists += sq_norms32[unique_a, None]
        self.dists += sq_norms32[None, :]
        own_rows, own_cols = _own_class_entries(block_start[first], block_end[first])
        self.dists[own_rows, own_cols] = np.inf
        self.nearest = self.dists.min(axis=1)


class _CandidateRule:
    """insightface's candidate rule decided as float64 arithmetic on the differences would decide it.

    The bulk distances come from a float32 matrix product ``|e_a|^2 + |e_n|^2 - 2 e_a . e_n`` whose
    error is below ``tol = (D + 8) u (|e_a| + |e_n|)^2`` (u = 2^-24; ``D u`` covers the D-term dot
    products and squared norms, ``8 u`` the float64 -> float32 conversion and the few additions).
    Entries of ``diff = d(a, n) - d(a, p)`` farther than ``tol`` from both boundaries (0 and alpha)
    are decided by the float32 values; the few inside that band are recomputed in float64.
    """

    def __init__(self, embeddings, nrof_images_per_class, alpha, max_ap):
        self.emb, sizes = _check_inputs(embeddings, nrof_images_per_class, alpha, max_ap)
        self.alpha, self.max_ap = float(alpha), float(max_ap)
        self.num_classes = sizes.size
        self.num_images, dim = self.emb.shape
        self.pairs = class_pairs(sizes)
        self.emb32 = self.emb.astype(np.float32)
        self.sq_norms32 = np.einsum("ij,ij->i", self.emb32, self.emb32)
        max_norm = float(np.sqrt(np.max(np.einsum("ij,ij->i", self.emb, self.emb)))) if self.num_images else 0.0
        self.tol = np.float32((dim + 8) * 2.0 ** -24 * (2.0 * max_norm) ** 2)
        self.alpha32 = np.float32(self.alpha)

    def chunks(self):
        """Yield :class:`_PairChunk` over all pairs, ``CHUNK_ELEMENTS // N`` pairs at a time."""
        anchors, positives, block_start, block_end = self.pairs
        step = max(1, CHUNK_ELEMENTS // max(self.num_images, 1))
        for lo in range(0, anchors.size, step):
            part = slice(lo, lo + step)
            yield _PairChunk(self.emb, self.emb32, self.sq_norms32, anchors[part], positives[part],
                             block_start[part], block_end[part])

    def eligible(self, chunk):
        """Pairs of the chunk that may have candidates (indices into the chunk).

        Drops the pairs skipped by ``max_ap`` and those whose nearest other-class image is already
        at ``d(a, n) >= d(a, p) + alpha + tol`` (no candidate is possible; after pre-training this is
        most pairs, and it costs one pass over the distance rows instead of one per pair).
        """
        possible = chunk.nearest[chunk.row_of_pair] < chunk.pos32 + self.alpha32 + self.tol
        if self.max_ap > 0:
            possible &= chunk.pos <= self.max_ap
        return np.flatnonzero(possible)

    def _refine(self, chunk, rows, cols, diff, loose):
        """Recompute in float64 the entries of ``loose`` whose float32 ``diff`` lies within ``tol`` of a
        boundary; ``rows``/``cols`` map each entry of ``diff`` to (pair in chunk, image)."""
        band = loose & ((diff <= self.tol) | (diff >= self.alpha32 - self.tol))
        band_at = _nonzero(band)
        if band_at[0].size:
            pair_rows, images = rows[band_at], cols[band_at]
            exact = _exact_sq_dists(self.emb, chunk.anchors[pair_rows], images) - chunk.pos[pair_rows]
            # exact > 0 is exactly pos < neg for finite floats (x - y == 0 only when x == y).
            loose[band_at] = (exact < self.alpha) & (exact > 0.0)
        return loose

    def decide(self, chunk, rows, cols):
        """Candidate flags (same shape as ``cols``) of images ``cols[k, j]`` for pairs ``rows[k]``."""
        rows2 = np.broadcast_to(rows[:, None], cols.shape)
        diff = chunk.dists[chunk.row_of_pair[rows2], cols] - chunk.pos32[rows2]
        loose = (diff > -self.tol) & (diff < self.alpha32 + self.tol)   # own class: inf, never loose
        return self._refine(chunk, rows2, cols, diff, loose)

    def mask(self, chunk, rows):
        """Candidate mask (len(rows), N) of the pairs ``rows`` of the chunk over the whole bag."""
        diff = chunk.dists[chunk.row_of_pair[rows]]                 # (K, N) float32: d(a, n) ...
        diff -= chunk.pos32[rows, None]                             # ... minus d(a, p)
        loose = (diff > -self.tol) & (diff < self.alpha32 + self.tol)
        with_any = np.flatnonzero(loose.any(axis=1))
        if with_any.size:
            sub = loose[with_any]
            cols = np.broadcast_to(np.arange(self.num_images), sub.shape)
            loose[with_any] = self._refine(chunk, np.broadcast_to(rows[with_any, None], sub.shape), cols,
                                           diff[with_any], sub)
        return loose


def semi_hard_candidates(embeddings, nrof_images_per_class, alpha, max_ap=0.0):
    """Candidate negatives of every (anchor, positive) pair under insightface's rule.

    Parameters
    ----------
    embeddings : array_like, shape (N, D)
        L2-normalised embeddings of one bag, classes in consecutive blocks.
    nrof_images_per_class : sequence of int, length C, summing to N
    alpha : float
        Semi-hard margin (squared-L2 units).
    max_ap : float, default 0.0
        Pairs with ``d(a, p) > max_ap`` get no candidates (0 = off).

    Returns
    -------
    dict mapping (a, p) -> ndarray of int64
        The sorted candidate negatives of every within-class pair ``a < p`` (empty when none).
        Used by tests and the benchmark; :func:`pick_triplets` draws from these sets.
    """
    rule = _CandidateRule(embeddings, nrof_images_per_class, alpha, max_ap)
    result = {}
    empty = np.zeros(0, dtype=np.int64)
    for chunk in rule.chunks():
        result.update((pair, empty) for pair in zip(chunk.anchors.tolist(), chunk.positives.tolist()))
        rows = rule.eligible(chunk)
        mask = rule.mask(chunk, rows)
        for k, row in enumerate(rows.tolist()):
            result[(int(chunk.anchors[row]), int(chunk.positives[row]))] = np.flatnonzero(mask[k])
    return result


def pick_triplets(embeddings, nrof_images_per_class, alpha, max_ap=0.0, rng=None):
    """Select FaceNet semi-hard triplets from one bag, as insightface's ``pick_triplets`` does.

    Parameters
    ----------
    embeddings : array_like, shape (N, D)
        L2-normalised embeddings of the bag (not modified). Images of one class are consecutive.
    nrof_images_per_class : sequence of int, length C
        Consecutive class block sizes, summing to N (classes with < 2 images yield no pair).
    alpha : float
        Margin: ``n`` is a candidate for ``(a, p)`` when
        ``||a-n||^2 - ||a-p||^2 < alpha`` and ``||a-p||^2 < ||a-n||^2``, ``n`` outside the class.
    max_ap : float, default 0.0
        When > 0, pairs with ``||a-p||^2 > max_ap`` are skipped.
    rng : None, int, numpy.random.RandomState or numpy.random.Generator
        Source of the uniform choice among candidates and of the final shuffle; an int seeds a
        new ``default_rng`` Generator (same seed -> same triplets), None draws fresh entropy, a
        RandomState or Generator is drawn from (and advanced) as given.

    Returns
    -------
    list of (int, int, int)
        ``(anchor, positive, negative)`` row indices into ``embeddings``, one per pair ``a < p``
        whose candidate set is non-empty, in random order. At most ``n(n-1)/2`` per class.

    Raises
    ------
    ValueError
        Non-2-D or non-finite embeddings, block sizes that do not sum to N, negative alpha/max_ap.
    """
    rule = _CandidateRule(embeddings, nrof_images_per_class, alpha, max_ap)
    rng = _as_rng(rng)
    draws = REJECTION_DRAWS
    picked = []
    for chunk in rule.chunks():
        rows = rule.eligible(chunk)
        negatives = np.full(rows.size, -1, dtype=np.int64)
        if draws and rows.size:
            # Rejection sampling: the first candidate among uniform draws over the bag is uniform over
            # the candidates, whatever their number; it settles the pairs with many candidates (the
            # common case early in training) without scanning their rows.
            cols = rng.integers(0, rule.num_images, size=(rows.size, draws))
            hits = rule.decide(chunk, rows, cols)
            found = hits.any(axis=1)
            negatives[found] = cols[found, np.argmax(hits[found], axis=1)]
        rest = np.flatnonzero(negatives < 0)
        if rest.size:
            # Pairs not settled by the draws have few candidates: list them, then draw one uniform
            # rank per pair (pairs without candidates draw too and are dropped, keeping the generator's
            # consumption independent of the outcome).
            cand_rows, cand_cols = _nonzero(rule.mask(chunk, rows[rest]))
            counts = np.bincount(cand_rows, minlength=rest.size)
            choice = rng.integers(0, np.maximum(counts, 1))
            keep = counts > 0
            first = np.cumsum(counts) - counts
            negatives[rest[keep]] = cand_cols[first[keep] + choice[keep]]
        ok = negatives >= 0
        picked.append(np.stack([chunk.anchors[rows[ok]], chunk.positives[rows[ok]], negatives[ok]], axis=1))
    triplets = np.concatenate(picked) if picked else np.zeros((0, 3), dtype=np.int64)
    logger.debug("pick_triplets: %d triplets from %d images in %d classes", len(triplets), rule.num_images,
                 rule.num_classes)
    triplets = triplets[rng.permutation(len(triplets))]
    return [tuple(t) for t in triplets.tolist()]
