"""FaceNet semi-hard triplet selection for insightface's triplet training (spec §4.4).

insightface's ``TripletFaceImageIter.pick_triplets`` walks every (anchor, positive) pair of every
class in Python and, for each pair, scans a full row of squared distances for semi-hard negatives.
The functions here apply exactly the same rule with numpy on chunks of many pairs at once:

* distances are squared Euclidean, ``d(i, j) = ||e_i - e_j||^2`` (in [0, 4] for L2-normalised rows);
* for every pair ``a < p`` inside one class block, the candidate negatives are the images ``n``
  outside the block with

  .. math:: d(a, n) - d(a, p) < \\alpha \\quad\\text{and}\\quad d(a, p) < d(a, n);

* a pair with ``max_ap > 0`` and ``d(a, p) > max_ap`` is skipped;
* every pair with at least one candidate yields one triplet whose negative is drawn uniformly
  among its candidates; the final list is shuffled.

Unlike upstream, the inputs are never modified: upstream aliases a row of its distance matrix
(``neg_dists_sqr = pdists[a_idx]``) and writes NaN into it in place (spec §4.4, §13); here the
own-class columns are excluded with a mask instead.
"""
import logging

import numpy as np

logger = logging.getLogger(__name__)

# Upper bound on the number of (pair, image) entries held in one chunk of the candidate mask.
# 2**22 float32 values are 16 MiB; a few temporaries of that size keep the peak memory of mining a
# 7,200-image bag around 100 MiB while the matrix products stay large enough to run near BLAS speed.
CHUNK_ELEMENTS = 2 ** 22


def _as_rng(rng):
    """Return a ``np.random.Generator`` from a Generator, an int seed or None (fresh entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"pick_triplets: rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


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


def _exact_sq_dists(emb, rows, cols):
    """``||emb[rows] - emb[cols]||^2`` in float64 from the differences (the reference definition)."""
    diff = emb[rows] - emb[cols]
    return np.einsum("ij,ij->i", diff, diff)


def _iter_candidate_chunks(emb, sizes, alpha, max_ap):
    """Yield ``(anchors, positives, mask)`` for chunks of pairs; ``mask[k, n]`` marks candidates.

    Decisions are those of float64 arithmetic on ``d(i, j) = sum_d (e_id - e_jd)^2``, at float32
    speed: the distances of a chunk's anchors to the whole bag come from one float32 matrix product
    ``d(a, n) = |e_a|^2 + |e_n|^2 - 2 e_a . e_n``, whose error is bounded by
    ``tol = (D + 8) u (|e_a| + |e_n|)^2`` (u = 2^-24; ``D u`` covers the D-term dot products and
    squared norms, ``8 u`` the float64 to float32 conversion and the few additions and subtractions). Entries farther than ``tol`` from both boundaries
    (``diff = 0`` and ``diff = alpha``) are decided by the float32 values; the few inside the band
    are recomputed exactly in float64. Every step is an array expression over the whole chunk.
    """
    anchors, positives, block_start, block_end = class_pairs(sizes)
    num_images, dim = emb.shape
    if anchors.size == 0:
        return
    emb32 = emb.astype(np.float32)
    sq_norms32 = np.einsum("ij,ij->i", emb32, emb32)
    max_norm = float(np.sqrt(np.max(np.einsum("ij,ij->i", emb, emb))))
    tol = np.float32((dim + 8) * 2.0 ** -24 * (2.0 * max_norm) ** 2)
    pairs_per_chunk = max(1, CHUNK_ELEMENTS // max(num_images, 1))
    for lo in range(0, anchors.size, pairs_per_chunk):
        hi = min(lo + pairs_per_chunk, anchors.size)
        chunk_a, chunk_p = anchors[lo:hi], positives[lo:hi]
        pos = _exact_sq_dists(emb, chunk_a, chunk_p)                # (K,) float64
        # Each anchor has up to n-1 positives: compute its distance row once and gather it per pair.
        unique_a, row_of_pair = np.unique(chunk_a, return_inverse=True)
        dists = sq_norms32[unique_a, None] + sq_norms32[None, :]
        dists -= 2.0 * (emb32[unique_a] @ emb32.T)
        diff = dists[row_of_pair]                                   # (K, N) float32: d(a, n) ...
        diff -= pos.astype(np.float32)[:, None]                     # ... minus d(a, p)
        mask = (diff > -tol) & (diff < np.float32(alpha) + tol)     # candidates plus the band
        own_rows, own_cols = _own_class_entries(block_start[lo:hi], block_end[lo:hi])
        mask[own_rows, own_cols] = False
        if max_ap > 0:
            mask &= (pos <= max_ap)[:, None]
        rows_with_any = np.flatnonzero(mask.any(axis=1))
        if rows_with_any.size:
            sub_diff = diff[rows_with_any]
            band = mask[rows_with_any] & ((sub_diff <= tol) | (sub_diff >= np.float32(alpha) - tol))
            band_rows, band_cols = np.nonzero(band)
            rows = rows_with_any[band_rows]
            exact = _exact_sq_dists(emb, chunk_a[rows], band_cols) - pos[rows]
            # exact > 0 is exactly pos < neg for finite floats (x - y == 0 only when x == y).
            mask[rows, band_cols] = (exact < alpha) & (exact > 0.0)
        yield chunk_a, chunk_p, mask


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
    emb, sizes = _check_inputs(embeddings, nrof_images_per_class, alpha, max_ap)
    result = {}
    for chunk_a, chunk_p, mask in _iter_candidate_chunks(emb, sizes, alpha, max_ap):
        for k, (a, p) in enumerate(zip(chunk_a.tolist(), chunk_p.tolist())):
            result[(a, p)] = np.flatnonzero(mask[k])
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
    rng : numpy.random.Generator, int or None
        Source of the uniform choice among candidates and of the final shuffle; an int seeds a
        new generator (same seed -> same triplets), None draws fresh entropy.

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
    emb, sizes = _check_inputs(embeddings, nrof_images_per_class, alpha, max_ap)
    rng = _as_rng(rng)
    picked = []
    # Running candidate counts fit int16 for bags below 32,768 images (7,200 upstream).
    count_dtype = np.int16 if emb.shape[0] < np.iinfo(np.int16).max else np.int32
    for chunk_a, chunk_p, mask in _iter_candidate_chunks(emb, sizes, alpha, max_ap):
        counts = np.count_nonzero(mask, axis=1)
        # One uniform draw per pair (pairs without candidates draw too and are dropped, which keeps
        # the generator's consumption independent of the outcome).
        choice = rng.integers(0, np.maximum(counts, 1))
        keep = counts > 0
        if not np.any(keep):
            continue
        # The chosen negative is the column where the running count of candidates first exceeds
        # the draw, i.e. the (choice+1)-th candidate of the row.
        running = np.cumsum(mask[keep], axis=1, dtype=count_dtype)
        negatives = np.argmax(running > choice[keep, None].astype(count_dtype), axis=1)
        picked.append(np.stack([chunk_a[keep], chunk_p[keep], negatives], axis=1))
    if not picked:
        return []
    triplets = np.concatenate(picked)
    triplets = triplets[rng.permutation(len(triplets))]
    return [tuple(t) for t in triplets.tolist()]
