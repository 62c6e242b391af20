"""TripletFaceImageIter: device layout, live weights, loss contract, augmentation, errors.

Tiny 16x16 synthetic identities and a tiny conv/FC network keep every test well under a second of
compute; the Modules use one or two CPU contexts exactly as the engine binds them.
"""
import logging
import os

import mxnet as mx
import numpy as np
import pytest

import iterators.triplet_iter as triplet_iter
from iterators import TripletFaceImageIter, augment
from iterators.formats.recordio import IRHeader, RecordWriter, pack
from iterators.triplet_iter import l2_normalize_rows, run_lengths
from symbols.losses import triplet_loss
from tests.data_fixtures import make_synthetic_dataset

SIDE = 16
EMB = 6
DATA_SHAPE = (3, SIDE, SIDE)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("triplet"), identities=8, images_per_identity=6,
                                  image_size=SIDE, holdout_identities=0)


def tiny_symbol(per_batch_size, alpha=0.3, angular=False):
    """conv -> BN -> relu -> pool -> fc1 (EMB): Convolution and FullyConnected are the ops whose weights
    MKLDNN caches; BatchNorm makes is_train=False (moving statistics) differ from training mode.

    BN momentum 1 keeps the moving statistics at their initial values: with several contexts each device
    otherwise keeps its own statistics (MXNet's data parallelism), which a fresh Module built from the
    device-averaged ``get_params`` could not reproduce exactly."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv0")
    x = mx.sym.BatchNorm(x, fix_gamma=False, momentum=1.0, name="bn0")
    x = mx.sym.Activation(x, act_type="relu")
    x = mx.sym.Pooling(x, kernel=(4, 4), stride=(4, 4), pool_type="avg")
    fc1 = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=EMB, name="fc1")
    loss = triplet_loss(fc1, per_batch_size, alpha, angular=angular)
    return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.BlockGrad(mx.sym.var("softmax_label")),
                         mx.sym.MakeLoss(loss)])


def r18_symbol(per_batch_size, alpha=0.3):
    """The real training symbol (quarter-width r18 with fast PReLU, 'E' head, triplet loss)."""
    import symbols
    return symbols.get_symbol({"network": "r18", "net_multiplier": 0.25, "emb_size": EMB, "loss": "triplet",
                               "per_batch_size": per_batch_size, "triplet_alpha": alpha})


def make_module(per_batch_size, ctx_num, alpha=0.3, seed=0, network="tiny"):
    contexts = [mx.cpu(i) for i in range(ctx_num)]
    batch = per_batch_size * ctx_num
    symbol = tiny_symbol(per_batch_size, alpha) if network == "tiny" else r18_symbol(per_batch_size, alpha)
    module = mx.mod.Module(symbol, context=contexts)
    module.bind(data_shapes=[("data", (batch,) + DATA_SHAPE)], label_shapes=[("softmax_label", (batch,))])
    mx.random.seed(seed)
    module.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    return module


def make_iter(dataset, module, per_batch_size=6, ctx_num=1, bag=None, alpha=0.3, **kwargs):
    batch = per_batch_size * ctx_num
    return TripletFaceImageIter(batch, DATA_SHAPE, f"{dataset}/train.rec", ctx_num=ctx_num, images_per_identity=5,
                                triplet_params=[bag or 3 * batch, alpha, 0.0], mx_model=module,
                                **{"seed": 0, **kwargs})


def fresh_embeddings(module, images, per_batch_size, ctx_num, network="tiny"):
    """Embeddings of ``images`` from a NEW Module holding ``module``'s current parameters."""
    # BatchNorm's backward writes the moving statistics without declaring them to MXNet's engine as
    # outputs, so get_params right after forward_backward can copy them before that write: wait first.
    mx.nd.waitall()
    module._params_dirty = True
    arg_params, aux_params = module.get_params()
    other = make_module(per_batch_size, ctx_num, network=network)
    other.set_params(arg_params, aux_params)
    batch = per_batch_size * ctx_num
    out = []
    for start in range(0, len(images), batch):
        chunk = np.zeros((batch,) + DATA_SHAPE, dtype=np.float32)
        part = images[start:start + batch]
        chunk[:len(part)] = part
        other.forward(mx.io.DataBatch([mx.nd.array(chunk)], [mx.nd.zeros((batch,))]), is_train=False)
        out.append(other.get_outputs()[0].asnumpy()[:len(part)])
    return np.concatenate(out)


def decoded(iterator, record_id):
    return augment.to_chw_float(augment.decode_image(iterator.reader.read(record_id)[1], (SIDE, SIDE)))


@pytest.mark.parametrize("ctx_num", [1, 2])
def test_device_slices_are_anchors_positives_negatives(dataset, ctx_num):
    per_batch = 6
    module = make_module(per_batch, ctx_num)
    alpha = 0.5
    it = make_iter(dataset, module, per_batch, ctx_num, alpha=alpha)
    third = per_batch // 3
    batches = list(it)
    assert len(batches) == it.num_batches >= 2
    assert len(it.seq) >= 2 * it.batch_size
    labels_of = dict(zip(it.seq, it.labels_of(it.seq).tolist()))
    unique_ids = sorted(set(it.seq))
    emb = l2_normalize_rows(fresh_embeddings(module, np.stack([decoded(it, r) for r in unique_ids]),
                                             per_batch, ctx_num))
    emb_of = dict(zip(unique_ids, emb))
    for n, batch in enumerate(batches):
        ids = it.seq[n * it.batch_size:(n + 1) * it.batch_size]
        np.testing.assert_array_equal(batch.label[0].asnumpy(), [labels_of[r] for r in ids])
        np.testing.assert_array_equal(batch.data[0].asnumpy(), np.stack([decoded(it, r) for r in ids]))
        for dev in range(ctx_num):
            part = ids[dev * per_batch:(dev + 1) * per_batch]
            for a, p, neg in zip(part[:third], part[third:2 * third], part[2 * third:]):
                assert a != p and labels_of[a] == labels_of[p] != labels_of[neg]
                d_ap = np.sum((emb_of[a] - emb_of[p]) ** 2)
                d_an = np.sum((emb_of[a] - emb_of[neg]) ** 2)
                assert d_ap < d_an + 1e-5 and d_an - d_ap < alpha + 1e-5


@pytest.mark.parametrize("network, ctx_num, lr", [("tiny", 1, 5.0), ("tiny", 2, 5.0), ("r18", 1, 0.005)])
def test_mining_uses_weights_after_optimizer_updates(dataset, network, ctx_num, lr, monkeypatch):
    per_batch = 6
    module = make_module(per_batch, ctx_num, network=network)
    module.init_optimizer(kvstore="device", optimizer="sgd",
                          optimizer_params={"learning_rate": lr, "momentum": 0.0, "rescale_grad": 1.0 / ctx_num})
    mined = []
    real_pick = triplet_iter.pick_triplets

    def spy(embeddings, sizes, *args, **kwargs):
        mined.append(np.array(embeddings))
        return real_pick(embeddings, sizes, *args, **kwargs)

    monkeypatch.setattr(triplet_iter, "pick_triplets", spy)
    it = make_iter(dataset, module, per_batch, ctx_num, alpha=1.0, shuffle=False)
    it.reset()
    bag = it.triplet_seq[:it.bag_size]
    images = np.stack([decoded(it, r) for r in bag])
    before = l2_normalize_rows(fresh_embeddings(module, images, per_batch, ctx_num, network))
    np.testing.assert_allclose(mined[0], before, atol=1e-5)

    for _ in range(3):
        module.forward_backward(it.next())
        module.update()
    after = l2_normalize_rows(fresh_embeddings(module, images, per_batch, ctx_num, network))
    assert np.all(np.isfinite(after))
    assert np.abs(after - before).max() > 1e-2, "updates did not change the weights; the test proves nothing"

    # Same bag again (pool order is fixed with shuffle=False): the next reset mines with the new weights.
    it.triplet_cur = 0
    mined.clear()
    it.reset()
    np.testing.assert_allclose(mined[0], after, atol=1e-5)


@pytest.mark.skipif(os.environ.get("MXNET_SUBGRAPH_BACKEND") == "NONE", reason="MKLDNN subgraph backend disabled")
def test_weight_check_detects_a_stale_executor():
    """The comparison above can fail: an executor made with ``Symbol.bind`` on the Module's own arrays
    (MKLDNN subgraph backend, CPU) does not follow the optimizer updates (its
    FullyConnected/Convolution weights are cached at the first forward)."""
    per_batch = 6
    module = make_module(per_batch, 1)
    module.init_optimizer(kvstore="device", optimizer="sgd", optimizer_params={"learning_rate": 5.0})
    group = module._exec_group
    arrays = dict(zip(group.param_names, (a[0] for a in group.param_arrays)))
    aux = dict(zip(group.aux_names, (a[0] for a in group.aux_arrays)))
    emb_sym = tiny_symbol(per_batch).get_internals()["fc1_output"]
    images = np.random.RandomState(0).uniform(0, 255, (per_batch,) + DATA_SHAPE).astype(np.float32)
    args = {k: arrays[k] for k in emb_sym.list_arguments() if k != "data"}
    args["data"] = mx.nd.array(images)
    executor = emb_sym.bind(mx.cpu(), args, aux_states={k: aux[k] for k in emb_sym.list_auxiliary_states()})
    executor.forward(is_train=False)
    batch = mx.io.DataBatch([mx.nd.array(images)], [mx.nd.zeros((per_batch,))])
    for _ in range(3):
        module.forward_backward(batch)
        module.update()
    stale = executor.forward(is_train=False)[0].asnumpy()
    live = fresh_embeddings(module, images, per_batch, 1)
    assert not np.allclose(stale, live, atol=1e-3)


def test_loss_per_device_matches_numpy_on_iterator_layout(dataset):
    per_batch, ctx_num, alpha = 6, 2, 0.3
    module = make_module(per_batch, ctx_num, alpha)
    it = make_iter(dataset, module, per_batch, ctx_num, alpha=1.0)
    batch = it.next()
    module.forward(batch, is_train=True)
    outputs = module.get_outputs(merge_multi_context=False)
    third = per_batch // 3
    for dev in range(ctx_num):
        emb = l2_normalize_rows(outputs[0][dev].asnumpy().astype(np.float64))
        a, p, n = emb[:third], emb[third:2 * third], emb[2 * third:]
        expected = np.mean(np.maximum(0.0, np.sum((a - p) ** 2, 1) - np.sum((a - n) ** 2, 1) + alpha))
        np.testing.assert_allclose(outputs[2][dev].asnumpy()[0], expected, rtol=1e-5, atol=1e-6)


def test_triplet_loss_hand_made_2d_points():
    # Per device: anchors (1,0),(0,1); positives at 60 and 90 degrees; negatives at 90 and 45 degrees.
    r = np.sqrt(0.5)
    emb = np.array([[1, 0], [0, 1], [0.5, np.sqrt(0.75)], [-1, 0], [0, 1], [r, r]], dtype=np.float32)
    # ||a-p||^2: 1.0, 2.0 ; ||a-n||^2: 2.0, 2 - 2r  ->  relu(1 - 2 + .3) = 0, relu(2 - 0.5858 + .3) = 1.7142
    expected = (0.0 + (2.0 - (2 - 2 * r) + 0.3)) / 2
    sym = triplet_loss(mx.sym.var("x"), 6, 0.3)
    out = sym.eval(ctx=mx.cpu(), x=mx.nd.array(emb))[0].asnumpy()
    np.testing.assert_allclose(out, [expected], rtol=1e-5)


def test_remines_at_every_reset(dataset):
    module = make_module(6, 1)
    it = make_iter(dataset, module, alpha=1.0)
    it.reset()
    first_rounds = len(it.bag_stats)
    first_seq = list(it.seq)
    it.reset()
    assert len(it.bag_stats) > first_rounds
    assert it.seq != first_seq
    for stats in it.bag_stats:
        assert stats["images"] == it.bag_size and 0 < stats["triplets"] <= stats["pairs"]


def test_seeded_iterators_agree(dataset):
    module = make_module(6, 1)
    first = make_iter(dataset, module, seed=5, rand_mirror=True)
    second = make_iter(dataset, module, seed=5, rand_mirror=True)
    for b1, b2 in zip(first, second):
        np.testing.assert_array_equal(b1.data[0].asnumpy(), b2.data[0].asnumpy())
    assert first.seq == second.seq


def test_cutoff_always_applied_with_127_5_and_mirror(dataset):
    module = make_module(6, 1)
    it = make_iter(dataset, module, cutoff=6, rand_mirror=False)
    batch = it.next()
    data = batch.data[0].asnumpy()
    for img in data:
        filled = np.all(img == 127.5, axis=0)
        assert filled.sum() >= 9          # at least a 3x3 corner of the 6x6 square, on every image
    it = make_iter(dataset, module, rand_mirror=True, seed=1)
    flipped = 0
    for batch in it:
        ids = it.seq[it.cur - it.batch_size:it.cur]
        for img, r in zip(batch.data[0].asnumpy(), ids):
            plain = decoded(it, r)
            if np.array_equal(img, plain[:, :, ::-1]) and not np.array_equal(img, plain):
                flipped += 1
            else:
                np.testing.assert_array_equal(img, plain)
    assert flipped > 0


def test_too_few_triplets(dataset, monkeypatch, caplog):
    module = make_module(6, 1)
    with pytest.raises(RuntimeError, match="no semi-hard triplets"):
        make_iter(dataset, module, alpha=0.0).reset()
    calls = []

    def one_chunk_then_nothing(embeddings, sizes, alpha, max_ap, rng):
        calls.append(1)
        return [(0, 1, 7), (2, 3, 8)] if len(calls) == 1 else []

    monkeypatch.setattr(triplet_iter, "pick_triplets", one_chunk_then_nothing)
    it = make_iter(dataset, module)
    first_bag = it.triplet_seq[:it.bag_size]
    with caplog.at_level(logging.WARNING, logger="iterators.triplet_iter"):
        it.reset()
    assert it.num_batches == 1 and "only 1 triplet batch" in caplog.text
    assert len(calls) == 2 * it.bags_per_pass
    # [anchors | positives | negatives] of the two triplets, as record ids of the first bag.
    assert it.seq == [first_bag[i] for i in (0, 2, 1, 3, 7, 8)]


def test_helpers():
    np.testing.assert_allclose(l2_normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0, 0]])
    assert run_lengths([4, 4, 1, 1, 1, 4, 2]) == [2, 3, 1, 1]
    assert run_lengths([]) == []


def write_headerless_rec(path):
    with RecordWriter(f"{path}/plain.rec", f"{path}/plain.idx") as writer:
        for k in range(4):
            writer.write(k, pack(IRHeader(0, float(k % 2), k, 0), b"not-an-image"))
    return f"{path}/plain.rec"


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=8), "not divisible by 3"),
    (dict(batch_size=8, ctx_num=2, triplet_params=[24, 0.3, 0.0]), "not divisible by 3"),
    (dict(batch_size=9, ctx_num=2), "not divisible by ctx_num"),
    (dict(triplet_params=[20, 0.3, 0.0]), "not a multiple of the global batch 6"),
    (dict(images_per_identity=1), "must be >= 2"),
    (dict(triplet_params=[60, 0.3, 0.0]), "gives only 40 images"),
    (dict(triplet_params=[12, 1.5, 0.0]), "triplet_alpha"),
    (dict(triplet_params=[12, 0.3, -1.0]), "triplet_max_ap"),
    (dict(mx_model=None), "mx_model is required"),
])
def test_bad_arguments(dataset, kwargs, match):
    args = dict(batch_size=6, data_shape=DATA_SHAPE, path_imgrec=f"{dataset}/train.rec", images_per_identity=5,
                triplet_params=[12, 0.3, 0.0], mx_model=lambda x: np.zeros((len(x), 2)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TripletFaceImageIter(**args)


def test_rec_without_identity_records(tmp_path):
    with pytest.raises(ValueError, match="no insightface header"):
        TripletFaceImageIter(6, DATA_SHAPE, write_headerless_rec(tmp_path), triplet_params=[6, 0.3, 0.0],
                             mx_model=lambda x: np.zeros((len(x), 2)))
