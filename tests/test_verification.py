"""eval.verification: numbers equal a per-threshold loop port of insightface's algorithm; load_bin; test()."""
import cv2
import mxnet as mx
import numpy as np
import pytest
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from eval import verification as ver
from iterators.formats.bin_pack import PackFormatError, write_bin

# ----------------------------------------------------------------------------------------------
# Reference: a straightforward port of insightface's calculate_roc / calculate_val (FaceNet lfw.py),
# one pass over the data per threshold, sklearn KFold, scalar `dist < threshold` comparisons.
# calculate_val's SciPy interp1d (crashes on duplicate FARs) is replaced by the documented rule:
# first threshold per distinct FAR, then linear interpolation.


def ref_calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def ref_splits(nrof_pairs, nrof_folds):
    indices = np.arange(nrof_pairs)
    if nrof_folds == 1:
        return [(indices, indices)]
    return list(KFold(n_splits=nrof_folds, shuffle=False).split(indices))


def ref_roc_from_dist(thresholds, dist, actual_issame, nrof_folds):
    nrof_pairs = min(len(actual_issame), len(dist))
    splits = ref_splits(nrof_pairs, nrof_folds)
    tprs = np.zeros((len(splits), len(thresholds)))
    fprs = np.zeros((len(splits), len(thresholds)))
    accuracy = np.zeros(len(splits))
    for fold_idx, (train_set, test_set) in enumerate(splits):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = ref_calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        for threshold_idx, threshold in enumerate(thresholds):
            tprs[fold_idx, threshold_idx], fprs[fold_idx, threshold_idx], _ = ref_calculate_accuracy(
                threshold, dist[test_set], actual_issame[test_set])
        _, _, accuracy[fold_idx] = ref_calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set])
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy


def ref_val_far(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    return (float(true_accept) / float(n_same) if n_same else 0.0,
            float(false_accept) / float(n_diff) if n_diff else 0.0)


def ref_val_from_dist(thresholds, dist, actual_issame, far_target, nrof_folds):
    splits = ref_splits(min(len(actual_issame), len(dist)), nrof_folds)
    val = np.zeros(len(splits))
    far = np.zeros(len(splits))
    for fold_idx, (train_set, test_set) in enumerate(splits):
        far_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = ref_val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= far_target:
            xs, ts = [], []
            for f, t in zip(far_train, thresholds):  # first threshold of every distinct FAR
                if f not in xs:
                    xs.append(f)
                    ts.append(t)
            order = np.argsort(xs)
            threshold = np.interp(far_target, np.asarray(xs)[order], np.asarray(ts)[order])
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = ref_val_far(threshold, dist[test_set], actual_issame[test_set])
    return np.mean(val), np.std(val), np.mean(far)


def ref_evaluate(embeddings, actual_issame, nrof_folds=10):
    e1, e2 = embeddings[0::2], embeddings[1::2]
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    actual_issame = np.asarray(actual_issame)
    tpr, fpr, acc = ref_roc_from_dist(np.arange(0, 4, 0.01), dist, actual_issame, nrof_folds)
    val, val_std, far = ref_val_from_dist(np.arange(0, 4, 0.001), dist, actual_issame, 1e-3, nrof_folds)
    return tpr, fpr, acc, val, val_std, far


def _embeddings(rng, n_pairs, dim=16, noise=0.8, dtype=np.float32):
    """Unit embeddings where genuine pairs are noisy copies (so accuracy is neither 0.5 nor 1)."""
    issame = rng.random(n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(n_pairs, dim)), rng.normal(size=(n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return normalize(emb.astype(dtype)), issame


def _assert_same(ours, ref):
    for x, y in zip(ours, ref):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------- evaluate


def test_evaluate_equals_loop_reference():
    rng = np.random.default_rng(0)
    emb, issame = _embeddings(rng, 233)  # 233 pairs: the first 3 folds hold 24 pairs, the others 23
    _assert_same(ver.evaluate(emb, issame, nrof_folds=10), ref_evaluate(emb, issame, nrof_folds=10))


@pytest.mark.parametrize("n_pairs,nfolds,dtype", [(300, 10, np.float32), (300, 1, np.float64),
                                                   (157, 7, np.float64)])
def test_roc_and_val_equal_loop_reference(n_pairs, nfolds, dtype):
    # a coarser VAL grid than evaluate's keeps the per-threshold reference quick
    rng = np.random.default_rng(n_pairs + nfolds)
    emb, issame = _embeddings(rng, n_pairs, dtype=dtype)
    e1, e2 = emb[0::2], emb[1::2]
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    thr = np.arange(0, 4, 0.01)
    _assert_same(ver.calculate_roc(thr, e1, e2, issame, nrof_folds=nfolds),
                 ref_roc_from_dist(thr, dist, issame, nfolds))
    for far_target in (1e-3, 0.05):
        assert (ver.calculate_val(thr, e1, e2, issame, far_target, nrof_folds=nfolds)
                == ref_val_from_dist(thr, dist, issame, far_target, nfolds))


def test_float32_ties_at_thresholds_follow_scalar_comparison():
    # dist values exactly on float32(threshold): upstream's `float32_dist < np.float64(t)` compares in
    # float32, so float32(0.01) < 0.01 is False there although 0.0099999998 < 0.01 in float64.
    rng = np.random.default_rng(0)
    thresholds = np.arange(0, 4, 0.01)
    dist = rng.choice(thresholds[:120], size=400).astype(np.float32)
    issame = rng.random(400) < 0.5
    _assert_same(ver.roc_from_distances(thresholds, dist, issame, 10),
                 ref_roc_from_dist(thresholds, dist, issame, 10))
    val_thr = np.arange(0, 1.2, 0.001)
    dist = rng.choice(val_thr, size=400).astype(np.float32)
    _assert_same(ver.val_from_distances(val_thr, dist, issame, 1e-2, 10),
                 ref_val_from_dist(val_thr, dist, issame, 1e-2, 10))
    assert not (np.array([np.float32(0.01)]) < np.float64(0.01))[0]  # the numpy 1.x rule relied on


def test_perfectly_separable_gives_accuracy_one():
    rng = np.random.default_rng(1)
    base = normalize(rng.normal(size=(400, 64)))
    emb = np.empty((800, 64))
    issame = np.arange(400) % 2 == 0
    emb[0::2] = base
    emb[1::2] = np.where(issame[:, None], base, normalize(rng.normal(size=(400, 64))))
    tpr, fpr, accuracy, val, val_std, far = ver.evaluate(emb, issame)
    np.testing.assert_array_equal(accuracy, np.ones(10))
    assert val == 1.0 and val_std == 0.0 and far == 0.0


def test_random_embeddings_give_chance_accuracy():
    rng = np.random.default_rng(2)
    emb = normalize(rng.normal(size=(4000, 32)))
    issame = rng.permutation(np.arange(2000) % 2 == 0)
    accuracy = ver.evaluate(emb, issame)[2]
    assert abs(np.mean(accuracy) - 0.5) < 0.04


def test_hand_built_case_known_best_thresholds():
    # Two folds of 4 pairs; squared distances chosen by hand (e1 = 0, e2 = sqrt(d) on one axis).
    # fold 0: genuine 0.1, 0.3 | impostor 0.5, 0.9 ; fold 1: genuine 0.2, 0.6 | impostor 0.4, 1.0
    d = np.array([0.1, 0.3, 0.5, 0.9, 0.2, 0.6, 0.4, 1.0])
    issame = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    e1 = np.zeros((8, 2))
    e2 = np.stack([np.sqrt(d), np.zeros(8)], 1)
    # Test fold 0 trains on fold 1: accuracy 3/4 first reached for t in (0.2, 0.4] -> t = 0.21;
    #   on fold 0: 0.1 accepted, 0.3 rejected, impostors rejected -> 3/4 (t = 0.35 would give 1.0).
    # Test fold 1 trains on fold 0: 4/4 first reached at t = 0.31; on fold 1: 0.2 accepted,
    #   0.6 rejected, 0.4 and 1.0 rejected -> 3/4 (a mid-gap t = 0.45 would accept 0.4 -> 1/2).
    tpr, fpr, accuracy = ver.calculate_roc(np.arange(0, 4, 0.01), e1, e2, issame, nrof_folds=2)
    np.testing.assert_allclose(accuracy, [0.75, 0.75])
    # ROC at t = 0.45 (index 45): fold 0 tpr 1 fpr 0; fold 1 tpr 1/2 (0.2), fpr 1/2 (0.4) -> 0.75, 0.25
    assert tpr[45] == pytest.approx(0.75) and fpr[45] == pytest.approx(0.25)
    assert ver.calculate_accuracy(0.3, d[:4], issame[:4]) == (0.5, 0.0, 0.75)  # strict: 0.3 < 0.3 is False


def test_calculate_val_handles_duplicate_fars_and_empty_classes():
    # Quantised distances make far_train a step function with many repeats (interp1d would raise).
    rng = np.random.default_rng(3)
    dist = np.round(rng.random(200) * 2, 1)
    issame = np.zeros(200, bool)
    issame[:100] = dist[:100] < 1.0
    issame[20:40] = True  # fold 1 has only positives -> no negatives to measure FAR on
    val, val_std, far = ver.val_from_distances(np.arange(0, 4, 0.01), dist, issame, 1e-1, nrof_folds=10)
    ref = ref_val_from_dist(np.arange(0, 4, 0.01), dist, issame, 1e-1, 10)
    assert (val, val_std, far) == ref
    assert 0.0 <= val <= 1.0 and 0.0 <= far <= 1.0
    # Threshold rule: distinct FARs 0, 0.5, 1 are first reached at 0.1, 0.3, 0.7; FAR 0.25 lies
    # halfway between the first two points -> 0.2; FAR 0.5 -> exactly its first threshold 0.3.
    far_train = np.array([0, 0, 0.5, 0.5, 1.0, 1.0])
    thresholds = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    assert ver._threshold_at_far(far_train, thresholds, 0.25) == pytest.approx(0.2)
    assert ver._threshold_at_far(far_train, thresholds, 0.5) == pytest.approx(0.3)


def test_fewer_pairs_than_folds_and_shape_errors():
    with pytest.raises(ValueError, match="cannot be split into 10 folds"):
        ver.evaluate(np.ones((10, 4)), [True] * 5)
    with pytest.raises(ValueError, match=r"\(2N, D\)"):
        ver.evaluate(np.ones((9, 4)), [True] * 4)


def test_nan_embeddings_do_not_crash():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(2, 40, 8)).astype(np.float32)
    emb[0, :6] = np.nan
    res = ver.evaluate_embeddings([emb[0], emb[1]], rng.random(20) < 0.5, nfolds=10)
    assert 0.0 <= res.acc2 <= 1.0


def test_tpr_at_far_equals_evaluate_val():
    rng = np.random.default_rng(5)
    emb, issame = _embeddings(rng, 2000, noise=0.5)
    _, _, _, val, val_std, far = ver.evaluate(emb, issame)
    assert ver.tpr_at_far(emb, issame) == (val, val_std, far)
    assert val > 0.3  # 1e-3 of ~900 training negatives: the interpolated threshold accepts some positives


def test_pca_path_matches_loop_reference():
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(6)
    emb, issame = _embeddings(rng, 100, dim=12)
    e1, e2 = emb[0::2], emb[1::2]
    thresholds = np.arange(0, 4, 0.01)
    ours = ver.calculate_roc(thresholds, e1, e2, issame, nrof_folds=5, pca=4)
    tprs, fprs, accs = [], [], []
    for train_set, test_set in ref_splits(100, 5):
        pca = PCA(n_components=4).fit(np.concatenate((e1[train_set], e2[train_set])))
        dist = np.sum(np.square(normalize(pca.transform(e1)) - normalize(pca.transform(e2))), 1)
        # one fold of the reference: same fold layout, so reuse ref_roc_from_dist on a 1-fold view
        acc_train = [ref_calculate_accuracy(t, dist[train_set], issame[train_set])[2] for t in thresholds]
        best = int(np.argmax(acc_train))
        curve = [ref_calculate_accuracy(t, dist[test_set], issame[test_set]) for t in thresholds]
        tprs.append([c[0] for c in curve])
        fprs.append([c[1] for c in curve])
        accs.append(curve[best][2])
    _assert_same(ours, (np.mean(tprs, 0), np.mean(fprs, 0), np.array(accs)))


# ---------------------------------------------------------------------------------- load_bin


def _rgb_images(rng, count, size=(12, 12)):
    return [rng.integers(0, 256, size=size + (3,), dtype=np.uint8) for _ in range(count)]


def _png(rgb):
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])  # cv2 wants BGR; PNG is lossless
    assert ok
    return buf


def test_load_bin_normal_and_flipped(tmp_path):
    rng = np.random.default_rng(0)
    imgs = _rgb_images(rng, 20)
    path = tmp_path / "p.bin"
    write_bin(path, [_png(im) for im in imgs], [True, False] * 5)
    data_list, issame = ver.load_bin(str(path), (12, 12))
    assert issame == [True, False] * 5
    assert data_list[0].shape == (20, 3, 12, 12) and data_list[0].dtype == np.float32
    expected = np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(data_list[0].asnumpy(), expected)
    np.testing.assert_array_equal(data_list[1].asnumpy(), expected[:, :, :, ::-1])


def test_load_bin_resizes_like_upstream_and_refuses_wrong_aspect(tmp_path):
    rng = np.random.default_rng(1)
    big = [rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8) for _ in range(20)]
    write_bin(tmp_path / "big.bin", [_png(im) for im in big], [True] * 10)
    data_list, _ = ver.load_bin(str(tmp_path / "big.bin"), (12, 12))
    expected = mx.image.resize_short(mx.nd.array(big[3], dtype=np.uint8), 12).asnumpy().transpose(2, 0, 1)
    np.testing.assert_array_equal(data_list[0][3].asnumpy(), expected)
    wide = [rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8) for _ in range(20)]
    write_bin(tmp_path / "wide.bin", [_png(im) for im in wide], [True] * 10)
    with pytest.raises(PackFormatError, match=r"image 0 \(pair 0\) is 12x20 .*expected 12x12"):
        ver.load_bin(str(tmp_path / "wide.bin"), (12, 12))


def test_load_bin_refuses_undecodable_image(tmp_path):
    rng = np.random.default_rng(2)
    bins = [_png(im) for im in _rgb_images(rng, 20)]
    bins[7] = b"not an image"
    write_bin(tmp_path / "bad.bin", bins, [True] * 10)
    with pytest.raises(PackFormatError, match=r"image 7 \(pair 3\) cannot be decoded"):
        ver.load_bin(str(tmp_path / "bad.bin"), (12, 12))


@pytest.mark.parametrize("n_pairs", [11, 4, 7, 23, 1])
def test_load_bin_loads_any_pair_count(tmp_path, n_pairs):
    # insightface's load_bin never looks at the pair count; folds are the evaluation's business
    rng = np.random.default_rng(n_pairs)
    imgs = _rgb_images(rng, 2 * n_pairs)
    issame = [bool(k % 3) for k in range(n_pairs)]
    path = tmp_path / f"p{n_pairs}.bin"
    write_bin(path, [_png(im) for im in imgs], issame)
    data_set = ver.load_bin(str(path), (12, 12))
    data_list, got = data_set
    assert got == issame and data_list[0].shape == data_list[1].shape == (2 * n_pairs, 3, 12, 12)
    assert data_set[0] is data_list and len(data_set) == 2 and data_set.path == str(path)
    np.testing.assert_array_equal(data_list[0].asnumpy(), np.stack(imgs).transpose(0, 3, 1, 2))


# ------------------------------------------------------------------------------- uneven folds


def test_folds_equal_sklearn_kfold_and_lfold():
    for n, k in [(600, 10), (23, 10), (7, 5), (10, 10), (7, 1)]:
        ours = ver.kfold(n, k)
        theirs = ref_splits(n, k)
        assert len(ours) == len(theirs) == k
        for (a_train, a_test), (b_train, b_test) in zip(ours, theirs):
            np.testing.assert_array_equal(a_train, b_train)
            np.testing.assert_array_equal(a_test, b_test)


def test_uneven_folds_evaluate_as_upstream_and_warn(caplog):
    rng = np.random.default_rng(11)
    emb, issame = _embeddings(rng, 23)
    with caplog.at_level("WARNING", logger="eval.protocol"):
        ours = ver.evaluate(emb, issame, nrof_folds=10)
    _assert_same(ours, ref_evaluate(emb, issame, nrof_folds=10))
    uneven = [r for r in caplog.records if "uneven folds" in r.getMessage()]
    assert len(uneven) == 1, caplog.text  # one warning per evaluate (ROC and VAL share the folds)
    assert "23 pairs in 10 folds" in uneven[0].getMessage() and "first 3 hold 3 pairs" in uneven[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="eval.protocol"):
        ver.evaluate(*_embeddings(rng, 30), nrof_folds=10)
    assert "uneven" not in caplog.text


def test_fewer_pairs_than_folds_raise_like_kfold():
    with pytest.raises(ValueError, match="greater than the number of samples"):  # what upstream's KFold does
        ref_splits(7, 10)
    emb, issame = _embeddings(np.random.default_rng(12), 7)
    with pytest.raises(ver.FoldError, match=r"7 pairs cannot be split into 10 folds.*at most 7 folds"):
        ver.evaluate(emb, issame, nrof_folds=10)
    assert issubclass(ver.FoldError, ValueError)
    _assert_same(ver.evaluate(emb, issame, nrof_folds=7), ref_evaluate(emb, issame, nrof_folds=7))
    _assert_same(ver.evaluate(emb, issame, nrof_folds=1), ref_evaluate(emb, issame, nrof_folds=1))


# -------------------------------------------------------------------------------------- test()


def _training_like_module(batch_size, dim=3, hw=4, emb=5, classes=4):
    """data -> Flatten -> FC 'fc1' (embedding) ; outputs [BlockGrad(fc1), SoftmaxOutput(fc7)] like training."""
    data = mx.sym.Variable("data")
    fc1 = mx.sym.FullyConnected(mx.sym.Flatten(data), num_hidden=emb, name="fc1")
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=classes, name="fc7")
    sym = mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7, name="softmax")])
    mod = mx.mod.Module(sym, context=mx.cpu(), data_names=["data"], label_names=["softmax_label"])
    mod.bind(data_shapes=[("data", (batch_size, dim, hw, hw))], label_shapes=[("softmax_label", (batch_size,))])
    mod.init_params(mx.init.Normal(0.5))
    mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.5})
    return mod


def _numpy_embeddings(mod, data):
    args, _ = mod.get_params()
    w, b = args["fc1_weight"].asnumpy(), args["fc1_bias"].asnumpy()
    return data.reshape(data.shape[0], -1) @ w.T + b


@pytest.mark.parametrize("n_pairs,batch_size", [(10, 6), (10, 32), (20, 8)])
def test_test_matches_numpy_reference(n_pairs, batch_size):
    rng = np.random.default_rng(n_pairs + batch_size)
    data = rng.integers(0, 256, size=(2 * n_pairs, 3, 4, 4)).astype(np.float32)
    data_list = [mx.nd.array(data), mx.nd.array(data[:, :, :, ::-1])]
    issame = list(rng.random(n_pairs) < 0.5)
    mod = _training_like_module(batch_size)
    acc1, std1, acc2, std2, xnorm, embeddings_list = result = ver.test((data_list, issame), mod, batch_size, 10)
    ref = [_numpy_embeddings(mod, data), _numpy_embeddings(mod, data[:, :, :, ::-1].copy())]
    for ours, theirs in zip(embeddings_list, ref):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-2)
    norms = np.concatenate([np.linalg.norm(e, axis=1) for e in ref])
    assert xnorm == pytest.approx(norms.mean(), rel=1e-4)
    _, _, accuracy, val, _, _ = ver.evaluate(normalize(embeddings_list[0] + embeddings_list[1]), issame)
    assert (acc1, std1) == (0.0, 0.0)
    assert acc2 == np.mean(accuracy) and std2 == np.std(accuracy) and result.val == val


def test_test_sees_updated_weights():
    # The engine verifies with the training Module between updates: embeddings must use live weights.
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, size=(20, 3, 4, 4)).astype(np.float32)
    data_set = ([mx.nd.array(data), mx.nd.array(data[:, :, :, ::-1])], [True, False] * 5)
    mod = _training_like_module(8)
    before = ver.test(data_set, mod, 8).embeddings_list[0]
    batch = mx.io.DataBatch(data=[mx.nd.array(data[:8])], label=[mx.nd.array(np.arange(8) % 4)])
    mod.forward_backward(batch)
    mod.update()
    after = ver.test(data_set, mod, 8).embeddings_list[0]
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, _numpy_embeddings(mod, data), rtol=1e-4, atol=1e-2)


def _pack_on_disk(tmp_path, n_pairs, hw=4, seed=0):
    """A pack of ``n_pairs`` random 4x4 PNG pairs, loaded back with load_bin."""
    rng = np.random.default_rng(seed)
    imgs = _rgb_images(rng, 2 * n_pairs, size=(hw, hw))
    path = tmp_path / f"pairs{n_pairs}.bin"
    write_bin(path, [_png(im) for im in imgs], [bool(k % 2) for k in range(n_pairs)])
    return ver.load_bin(str(path), (hw, hw)), str(path)


def _ref_test(mod, data_set, nfolds):
    """insightface's test() in numpy: flip sum, normalize, KFold evaluate."""
    data = data_set[0][0].asnumpy()
    emb = _numpy_embeddings(mod, data) + _numpy_embeddings(mod, data[:, :, :, ::-1].copy())
    return ref_evaluate(normalize(emb), data_set[1], nrof_folds=nfolds)


@pytest.mark.parametrize("batch_size", [8, 32])  # 46 images: overlapping last window; 14 images: padded batch
def test_training_module_on_23_pair_pack_uneven_folds(tmp_path, caplog, batch_size):
    data_set, path = _pack_on_disk(tmp_path, 23)
    mod = _training_like_module(batch_size)
    with caplog.at_level("WARNING", logger="eval.protocol"):
        res = ver.test(data_set, mod, batch_size, 10)
    assert len(res.accuracy) == 10
    _, _, ref_acc, ref_val, _, _ = _ref_test(mod, data_set, 10)
    np.testing.assert_allclose(res.accuracy, ref_acc)
    assert res.acc2 == pytest.approx(np.mean(ref_acc)) and res.val == pytest.approx(ref_val)
    warned = [r.getMessage() for r in caplog.records if "uneven folds" in r.getMessage()]
    assert len(warned) == 1 and path in warned[0], caplog.text


def test_training_module_on_7_pair_pack(tmp_path, caplog):
    data_set, path = _pack_on_disk(tmp_path, 7, seed=1)
    mod = _training_like_module(8)
    forwards = []
    original_forward = mod.forward
    mod.forward = lambda *a, **k: (forwards.append(1), original_forward(*a, **k))[1]
    # 10 folds: sklearn's KFold (upstream) raises; we raise at evaluation, naming the pack and the fixes,
    # before embedding anything
    with pytest.raises(ver.FoldError) as err:
        ver.test(data_set, mod, 8, 10)
    message = str(err.value)
    assert path in message and "7 pairs cannot be split into 10 folds" in message
    assert "at most 7 folds" in message and "eval.build_bin --num-pairs" in message
    assert forwards == []
    # fewer folds work, uneven ones as KFold splits them
    for nfolds in (5, 7, 1):
        res = ver.test(data_set, mod, 8, nfolds)
        _, _, ref_acc, _, _, _ = _ref_test(mod, data_set, nfolds)
        np.testing.assert_allclose(res.accuracy, ref_acc)
    assert forwards  # the model did run


def test_verification_callback_on_uneven_pack_sees_live_weights(tmp_path):
    # the engine's train-time verifier (hooks.PeriodicVerification, formerly callbacks.VerificationCallback):
    # eval.verification.test on the training Module, nfolds 10
    try:
        from recognition.hooks import PeriodicVerification as VerificationCallback
    except ImportError:
        from recognition.callbacks import VerificationCallback
    data_set, _ = _pack_on_disk(tmp_path, 23, seed=2)
    mod = _training_like_module(8)
    callback = VerificationCallback([("odd", data_set)], 8, 1, ver.test)
    before = callback.run(mod, 1)["odd"]
    data = data_set[0][0].asnumpy()
    mod.forward_backward(mx.io.DataBatch(data=[mx.nd.array(data[:8])], label=[mx.nd.array(np.arange(8) % 4)]))
    mod.update()
    after = callback.run(mod, 2)["odd"]
    _, _, ref_acc, _, _, _ = _ref_test(mod, data_set, 10)
    assert after["acc"] == pytest.approx(float(np.mean(ref_acc)))
    assert after["xnorm"] != pytest.approx(before["xnorm"])


def test_embed_plain_and_flip_sum():
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, size=(13, 3, 4, 4)).astype(np.float32)
    mod = _training_like_module(5)
    plain = ver.embed(mx.nd.array(data), mod, 5)
    np.testing.assert_allclose(plain.embeddings, _numpy_embeddings(mod, data), rtol=1e-4, atol=1e-2)
    assert len(plain.views) == 1 and plain.seconds > 0
    flipped = data[:, :, :, ::-1].copy()
    summed = ver.embed(data, mod, 5, flip=True)  # numpy input, flip computed
    given = ver.embed(mx.nd.array(data), mod, 5, flip=True, flipped=mx.nd.array(flipped))
    np.testing.assert_allclose(summed.embeddings, given.embeddings, rtol=1e-6)
    np.testing.assert_allclose(summed.embeddings, _numpy_embeddings(mod, data) + _numpy_embeddings(mod, flipped),
                               rtol=1e-4, atol=2e-2)
    np.testing.assert_array_equal(given.embeddings, given.views[0] + given.views[1])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ver.embed(data, mod, 0)


def test_pixel_baseline_separates_near_duplicates():
    rng = np.random.default_rng(8)
    base = rng.integers(0, 256, size=(20, 3, 6, 6)).astype(np.float32)
    data = np.empty((40, 3, 6, 6), np.float32)
    issame = [True, False] * 10
    for i in range(20):
        data[2 * i] = base[i]
        data[2 * i + 1] = base[i] + rng.normal(0, 2, size=(3, 6, 6)) if issame[i] else base[(i + 7) % 20]
    res = ver.pixel_baseline(([mx.nd.array(data), mx.nd.array(data[:, :, :, ::-1].copy())], issame), nfolds=10)
    assert res.acc2 == 1.0
    flat = data.reshape(40, -1)
    centred = flat - flat.mean(0)
    assert res.xnorm == pytest.approx(np.linalg.norm(centred, axis=1).mean(), rel=1e-5)


def test_format_lines():
    res = ver.VerificationResult.build(0.0, 0.0, 0.998167, 0.002291, 22.1234567, [], val=0.97, val_std=0.01)
    assert ver.format_lines("lfw", res) == ["[lfw]XNorm: 22.123457", "[lfw]Accuracy: 0.00000+-0.00000",
                                            "[lfw]Accuracy-Flip: 0.99817+-0.00229",
                                            "[lfw]TPR@FAR=1e-3: 0.97000+-0.01000"]
    assert ver.format_lines("lfw", res, batch=2000, with_tpr=False) == [
        "[lfw][2000]XNorm: 22.123457", "[lfw][2000]Accuracy-Flip: 0.99817+-0.00229"]
