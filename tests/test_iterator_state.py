"""state_dict / load_state_dict of FaceImageIter and TripletFaceImageIter: O(1) resume, bitwise equal to a straight run.

A run is cut after k batches of an epoch (k = 0, mid-epoch, the last batch), its state goes through JSON into a
freshly built iterator, and every later batch (data and labels, bitwise), across later reset() calls, must equal
the straight run's. Loading must not decode (or embed, or mine) the skipped batches.
"""
import json
import re
import threading

import cv2
import mxnet as mx
import numpy as np
import pytest

import iterators.triplet_iter as triplet_iter
from iterators import FaceImageIter, TripletFaceImageIter, augment
from iterators.formats.recordio import write_face_rec
from symbols.losses import triplet_loss
from tests.data_fixtures import make_synthetic_dataset

S = 16


# --------------------------------------------------------------------------------------------- helpers
def _png(rgb):
    ok, enc = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return enc.tobytes()


def make_rec(path, counts, corrupt=(), seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for label, n in enumerate(counts):
        for _ in range(n):
            items.append((label, _png(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))))
    for k in corrupt:
        items[k] = (items[k][0], b"\xff\xd8 not really a jpeg")
    path.mkdir(parents=True, exist_ok=True)
    write_face_rec(path, items, image_size=(S, S))
    return str(path / "train.rec")


def take(it, n=None):
    """Up to ``n`` batches (all until StopIteration when None) as (data, label) numpy pairs."""
    out = []
    while n is None or len(out) < n:
        try:
            batch = it.next()
        except StopIteration:
            break
        out.append((batch.data[0].asnumpy(), batch.label[0].asnumpy()))
    return out


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (gd, gl), (ed, el) in zip(got, expected):
        np.testing.assert_array_equal(gd, ed)
        np.testing.assert_array_equal(gl, el)


def json_round_trip(state):
    text = json.dumps(state)
    back = json.loads(text)
    assert back == state
    return back


class DecodeCounter:
    """Wraps augment.decode_image and augment.decode_bgr (FaceImageIter's); records the record ids decoded (from
    the ``where`` argument), once per image: decode_image calls decode_bgr, and the inner call is not counted."""

    def __init__(self, monkeypatch):
        self.ids = []
        self._inside = threading.local()
        for name in ("decode_image", "decode_bgr"):
            monkeypatch.setattr(augment, name, self._counting(getattr(augment, name)))

    def _counting(self, real):
        def counting(payload, image_size, where="image"):
            if getattr(self._inside, "active", False):
                return real(payload, image_size, where)
            match = re.search(r"record (\d+)", where)
            self.ids.append(int(match.group(1)) if match else -1)
            self._inside.active = True
            try:
                return real(payload, image_size, where)
            finally:
                self._inside.active = False
        return counting


# --------------------------------------------------------------------------------------------- FaceImageIter
FACE_AUG = dict(shuffle=True, rand_mirror=True, cutoff=6, color_jittering=2, seed=11)
FACE_EPOCHS = 3


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    # 30 images (one corrupt) in batches of 4: 7 batches per epoch, the rest dropped.
    return make_rec(tmp_path_factory.mktemp("state_face"), (5, 6, 7, 4, 8), corrupt=(9,))


def make_face(rec, workers, **kwargs):
    return FaceImageIter(4, (3, S, S), rec, num_workers=workers, **{**FACE_AUG, **kwargs})


@pytest.fixture(scope="module")
def face_straight(face_rec):
    it = make_face(face_rec, 0)
    epochs = []
    for _ in range(FACE_EPOCHS):
        epochs.append(take(it))
        it.reset()
    assert all(len(e) == 7 for e in epochs)
    assert it.num_corrupt == FACE_EPOCHS
    return epochs


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("epoch, k", [(0, 0), (0, 1), (0, 3), (0, 7), (1, 0), (1, 2), (1, 7)])
def test_face_resume_equals_straight_run(face_rec, face_straight, workers, epoch, k):
    it = make_face(face_rec, workers)
    for e in range(epoch):
        assert_same(take(it), face_straight[e])
        it.reset()
    assert_same(take(it, k), face_straight[epoch][:k])
    state = json_round_trip(it.state_dict())
    assert state["epoch"] == (epoch if (epoch or k) else -1) and state["cursor"] == k
    it.close()

    resumed = make_face(face_rec, workers)
    resumed.load_state_dict(state)
    assert_same(take(resumed), face_straight[epoch][k:])  # k == 7: StopIteration at once
    with pytest.raises(StopIteration):
        resumed.next()
    for e in range(epoch + 1, FACE_EPOCHS):
        resumed.reset()
        assert_same(take(resumed), face_straight[e])
    resumed.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_face_chained_resume_and_state_after_load(face_rec, face_straight, workers):
    """A state taken from a resumed iterator (before and after its first next()) resumes as well."""
    it = make_face(face_rec, workers)
    take(it, 1)
    first = it.state_dict()
    second = make_face(face_rec, workers)
    second.load_state_dict(first)
    again = second.state_dict()  # before any next(): the same place
    assert again["position"] == first["position"] and again["cursor"] == 1
    assert_same(take(second, 2), face_straight[0][1:3])
    third = make_face(face_rec, workers)
    third.load_state_dict(json_round_trip(second.state_dict()))
    assert_same(take(third), face_straight[0][3:])
    fourth = make_face(face_rec, 1 - workers // 2)
    fourth.load_state_dict(again)
    assert_same(take(fourth), face_straight[0][1:])
    for i in (it, second, third, fourth):
        i.close()


def test_face_resume_with_aug_list_and_without_shuffle(face_rec):
    def noise(img, rng):
        return img.astype(np.float32) + rng.normal(0, 1, img.shape).astype(np.float32)

    for kwargs in (dict(aug_list=[noise]), dict(shuffle=False)):
        straight = make_face(face_rec, 0, **kwargs)
        ref = take(straight) + (straight.reset(), take(straight))[1]
        it = make_face(face_rec, 2, **kwargs)
        take(it, 5)
        resumed = make_face(face_rec, 0, **kwargs)
        resumed.load_state_dict(json_round_trip(it.state_dict()))
        got = take(resumed) + (resumed.reset(), take(resumed))[1]
        assert_same(got, ref[5:])


def test_face_load_decodes_only_the_batch_it_returns(tmp_path, monkeypatch):
    """O(1): loading decodes nothing; the first next() decodes only the images of the batch it returns."""
    rec = make_rec(tmp_path, (16, 16, 16, 16))
    straight = FaceImageIter(8, (3, S, S), rec, num_workers=0, **FACE_AUG)
    ref = take(straight)
    order = straight.seq.tolist()
    counter = DecodeCounter(monkeypatch)
    for k in (1, 6):
        it = FaceImageIter(8, (3, S, S), rec, num_workers=0, **FACE_AUG)
        take(it, k)
        state = it.state_dict()
        counter.ids.clear()
        resumed = FaceImageIter(8, (3, S, S), rec, num_workers=0, **FACE_AUG)
        resumed.load_state_dict(state)
        assert counter.ids == []
        batch = resumed.next()
        assert counter.ids == order[8 * k:8 * (k + 1)]
        np.testing.assert_array_equal(batch.data[0].asnumpy(), ref[k][0])
    # With decode workers the prefetch window is decoded ahead (as in a straight run), never anything before
    # the resume point, and as much for k = 1 as for k = 6.
    for k in (1, 6):
        it = FaceImageIter(8, (3, S, S), rec, num_workers=0, **FACE_AUG)  # no decode thread still running below
        take(it, k)
        state = it.state_dict()
        counter.ids.clear()
        resumed = FaceImageIter(8, (3, S, S), rec, num_workers=2, **FACE_AUG)
        resumed.load_state_dict(state)
        assert counter.ids == []
        np.testing.assert_array_equal(resumed.next().data[0].asnumpy(), ref[k][0])
        resumed.close()
        decoded = list(counter.ids)
        window = resumed.prefetch + 1  # the batch being consumed + the prefetch window behind it
        assert len(decoded) <= window * 8
        assert set(decoded) <= set(order[8 * k:8 * (k + window)])


def test_face_state_is_plain_json(face_rec):
    it = make_face(face_rec, 2)
    take(it, 3)
    state = it.state_dict()

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, float, bool, str)

    assert plain(state)
    assert len(json.dumps(state)) < 2000  # O(1): no image list, no per-batch record
    it.close()


def test_face_mismatch_raises_naming_the_field(face_rec, tmp_path):
    it = make_face(face_rec, 0)
    take(it, 2)
    state = it.state_dict()
    with pytest.raises(ValueError, match="batch_size mismatch"):
        FaceImageIter(2, (3, S, S), face_rec, num_workers=0, **FACE_AUG).load_state_dict(state)
    with pytest.raises(ValueError, match="seed mismatch"):
        make_face(face_rec, 0, seed=12).load_state_dict(state)
    other = make_rec(tmp_path / "other", (5, 6, 7, 4, 9))
    with pytest.raises(ValueError, match="num_(images|records) mismatch"):
        make_face(other, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="cutoff mismatch"):
        make_face(face_rec, 0, cutoff=4).load_state_dict(state)
    with pytest.raises(ValueError, match="images_filter mismatch"):
        make_face(face_rec, 0, images_filter=5).load_state_dict(state)
    with pytest.raises(ValueError, match="not a FaceImageIter state"):
        make_face(face_rec, 0).load_state_dict({"type": "TripletFaceImageIter"})
    # seed=None adopts the saved seed.
    adopting = make_face(face_rec, 0, seed=None)
    adopting.load_state_dict(state)
    rest = take(adopting)
    assert_same(rest, take(it))


# --------------------------------------------------------------------------------------------- TripletFaceImageIter
EMB = 6
PER_BATCH = 6


@pytest.fixture(scope="module")
def triplet_data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("state_triplet"), identities=8, images_per_identity=6,
                                  image_size=S, holdout_identities=0)


def tiny_module(ctx_num=1, seed=0):
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv0")
    x = mx.sym.BatchNorm(x, fix_gamma=False, momentum=1.0, name="bn0")
    x = mx.sym.Activation(x, act_type="relu")
    x = mx.sym.Pooling(x, kernel=(4, 4), stride=(4, 4), pool_type="avg")
    fc1 = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=EMB, name="fc1")
    symbol = mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.BlockGrad(mx.sym.var("softmax_label")),
                           mx.sym.MakeLoss(triplet_loss(fc1, PER_BATCH, 0.3))])
    batch = PER_BATCH * ctx_num
    module = mx.mod.Module(symbol, context=[mx.cpu(i) for i in range(ctx_num)])
    module.bind(data_shapes=[("data", (batch, 3, S, S))], label_shapes=[("softmax_label", (batch,))])
    mx.random.seed(seed)
    module.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    module.init_optimizer(kvstore="device", optimizer="sgd",
                          optimizer_params={"learning_rate": 0.5, "momentum": 0.0, "rescale_grad": 1.0 / ctx_num})
    return module


def make_triplet(data_dir, module, workers, **kwargs):
    args = dict(ctx_num=1, images_per_identity=5, triplet_params=[3 * PER_BATCH, 1.0, 0.0], mx_model=module,
                rand_mirror=True, cutoff=6, seed=3, num_workers=workers)
    args.update(kwargs)
    return TripletFaceImageIter(PER_BATCH, (3, S, S), f"{data_dir}/train.rec", **args)


TRIPLET_EPOCHS = 4


def train_epochs(it, module, epochs, first_epoch=0, skip=0, stop=None, record=None):
    """The engine's loop: every batch trains the module (so later mining sees new weights), reset per epoch.

    ``skip``: batches of ``first_epoch`` already done; ``stop=(epoch, k)``: return after k batches of epoch."""
    record = [] if record is None else record
    for epoch in range(first_epoch, epochs):
        n = skip if epoch == first_epoch else 0
        while True:
            if stop == (epoch, n):
                return record
            try:
                batch = it.next()
            except StopIteration:
                break
            record.append((epoch, batch.data[0].asnumpy(), batch.label[0].asnumpy()))
            module.forward_backward(batch)
            module.update()
            n += 1
        if stop == (epoch, n):
            return record
        it.reset()
    return record


@pytest.fixture(scope="module")
def triplet_straight(triplet_data):
    module = tiny_module()
    it = make_triplet(triplet_data, module, 0)
    record = train_epochs(it, module, TRIPLET_EPOCHS)
    return record, it


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("epoch, k", [(0, 0), (0, 1), (1, 0), (1, 2), (2, "end")])
def test_triplet_resume_equals_straight_run(triplet_data, triplet_straight, workers, epoch, k, monkeypatch):
    straight, _ = triplet_straight
    counts = [sum(1 for e, _, _ in straight if e == ep) for ep in range(TRIPLET_EPOCHS)]
    assert all(c >= 2 for c in counts)
    k = counts[epoch] if k == "end" else k
    module = tiny_module()
    it = make_triplet(triplet_data, module, workers)
    done = train_epochs(it, module, TRIPLET_EPOCHS, stop=(epoch, k))
    before = sum(counts[:epoch]) + k
    assert len(done) == before
    state = json_round_trip(it.state_dict())
    pool, pool_cur, seq = list(it.triplet_seq), it.triplet_cur, list(it.seq)
    it.close()

    # Loading restores the pool and the round's layout without embedding or mining anything.
    resumed = make_triplet(triplet_data, module, workers)
    calls = []
    real_pick, real_embed = triplet_iter.pick_triplets, TripletFaceImageIter.embed
    monkeypatch.setattr(triplet_iter, "pick_triplets", lambda *a, **kw: (calls.append("pick"), real_pick(*a, **kw))[1])
    monkeypatch.setattr(TripletFaceImageIter, "embed",
                        lambda self, ids: (calls.append("embed"), real_embed(self, ids))[1])
    resumed.load_state_dict(state)
    assert calls == []
    assert resumed.triplet_seq == pool and resumed.triplet_cur == pool_cur and resumed.seq == seq

    rest = train_epochs(resumed, module, TRIPLET_EPOCHS, first_epoch=epoch, skip=k)
    assert len(done) + len(rest) == len(straight)
    for (e1, d1, l1), (e2, d2, l2) in zip(done + rest, straight):
        assert e1 == e2
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(l1, l2)
    resumed.close()


def test_triplet_load_then_next_embeds_nothing_and_decodes_one_batch(triplet_data, monkeypatch):
    module = tiny_module()
    straight = make_triplet(triplet_data, module, 0)
    ref = take(straight)
    assert len(ref) >= 3
    it = make_triplet(triplet_data, module, 0)
    take(it, 2)
    state = it.state_dict()
    counter = DecodeCounter(monkeypatch)
    calls = []
    monkeypatch.setattr(TripletFaceImageIter, "embed", lambda self, ids: calls.append(ids))
    monkeypatch.setattr(triplet_iter, "pick_triplets", lambda *a, **kw: calls.append(a))
    resumed = make_triplet(triplet_data, module, 2)
    resumed.load_state_dict(state)
    batch = resumed.next()
    assert calls == []
    assert counter.ids == resumed.seq[2 * PER_BATCH:3 * PER_BATCH]
    np.testing.assert_array_equal(batch.data[0].asnumpy(), ref[2][0])
    np.testing.assert_array_equal(batch.label[0].asnumpy(), ref[2][1])
    resumed.close()


def test_triplet_state_before_first_next_mines_at_first_next(triplet_data):
    module = tiny_module()
    ref = take(make_triplet(triplet_data, module, 0))
    state = json_round_trip(make_triplet(triplet_data, module, 0).state_dict())
    assert state["epoch"] == -1 and not state["is_init"] and state["seq"] == []
    fresh = make_triplet(triplet_data, module, 0, seed=None)
    fresh.load_state_dict(state)
    assert fresh.bag_stats == []
    assert_same(take(fresh), ref)
    assert fresh.bag_stats and fresh.bag_stats[0]["round"] == 0


def test_triplet_bag_stats_json_per_mined_bag(triplet_data):
    module = tiny_module()
    it = make_triplet(triplet_data, module, 0)
    assert it.bag_stats == []  # nothing mined by the constructor
    it.next()
    first = len(it.bag_stats)
    assert first >= 1
    it.reset()
    assert len(it.bag_stats) > first
    json.dumps(it.bag_stats)
    for n, stats in enumerate(it.bag_stats):
        assert set(stats) == {"round", "bag", "images", "identities", "pairs", "triplets", "embed_seconds",
                              "mine_seconds"}
        assert stats["bag"] == n and stats["round"] == (0 if n < first else 1)
        assert all(type(v) in (int, float) for v in stats.values())
    state = json_round_trip(it.state_dict())
    assert state["round_bag_stats"] == it.bag_stats[first:]
    resumed = make_triplet(triplet_data, module, 0)
    resumed.load_state_dict(state)
    assert resumed.bag_stats == it.bag_stats[first:]
    resumed.reset()
    new = resumed.bag_stats[len(it.bag_stats) - first:]
    assert new and [s["bag"] for s in new] == list(range(len(it.bag_stats), len(it.bag_stats) + len(new)))
    assert all(s["round"] == 2 for s in new)


def test_triplet_mismatch_raises_naming_the_field(triplet_data, tmp_path):
    module = tiny_module()
    it = make_triplet(triplet_data, module, 0)
    take(it, 1)
    state = it.state_dict()
    with pytest.raises(ValueError, match="seed mismatch"):
        make_triplet(triplet_data, module, 0, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="alpha mismatch"):
        make_triplet(triplet_data, module, 0, triplet_params=[3 * PER_BATCH, 0.5, 0.0]).load_state_dict(state)
    with pytest.raises(ValueError, match="bag_size mismatch"):
        make_triplet(triplet_data, module, 0, triplet_params=[6 * PER_BATCH, 1.0, 0.0]).load_state_dict(state)
    with pytest.raises(ValueError, match="rand_mirror mismatch"):
        make_triplet(triplet_data, module, 0, rand_mirror=False).load_state_dict(state)
    other = make_synthetic_dataset(tmp_path, identities=9, images_per_identity=6, image_size=S, holdout_identities=0)
    with pytest.raises(ValueError, match="(identities|num_images|num_records) mismatch"):
        make_triplet(other, module, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size mismatch"):
        TripletFaceImageIter(3, (3, S, S), f"{triplet_data}/train.rec", images_per_identity=5,
                             triplet_params=[3 * PER_BATCH, 1.0, 0.0], mx_model=module,
                             rand_mirror=True, cutoff=6, seed=3).load_state_dict(state)
    face = make_face(make_rec(tmp_path / "face", (4, 4)), 0)
    with pytest.raises(ValueError, match="not a TripletFaceImageIter state"):
        make_triplet(triplet_data, module, 0).load_state_dict(face.state_dict())
    with pytest.raises(ValueError, match="not a FaceImageIter state"):
        face.load_state_dict(state)
