"""--resume restores the iterator position from ``iterator.json`` (no replay, no re-mining): a resumed run equals
a straight one (weights, optimizer state, step, lr, metrics.jsonl) for FaceImageIter softmax and
TripletFaceImageIter triplet training, and skipped batches are never decoded.

Tiny nets (one FullyConnected embedding) on 8x8 synthetic faces keep every run under a few seconds."""
import json
import os

import mxnet as mx
import numpy as np
import pytest

from data_fixtures import make_synthetic_dataset
from iterators import FaceImageIter, TripletFaceImageIter
from recognition.checkpoints import load_resume_state, read_state_tree
from recognition.config import load_config
from recognition.engine import fit
from recognition.hooks import Hook
from recognition.train_triplet import BagStatsHook

SIDE, EMB, IDENTITIES, PER_ID = 8, 6, 8, 6  # 48 training images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("resume"), identities=IDENTITIES,
                                  images_per_identity=PER_ID, image_size=SIDE, pack_pairs=20)


def softmax_symbol():
    data, label = mx.sym.var("data"), mx.sym.var("softmax_label")
    fc1 = mx.sym.FullyConnected(mx.sym.flatten(data * 0.0078125), num_hidden=EMB, name="fc1")
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=IDENTITIES, name="fc7")
    return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7, label, normalization="valid",
                                                                     name="softmax")])


def triplet_symbol(per_batch_size, alpha):
    from symbols.losses import triplet_loss
    data, label = mx.sym.var("data"), mx.sym.var("softmax_label")
    fc1 = mx.sym.FullyConnected(mx.sym.flatten(data * 0.0078125), num_hidden=EMB, name="fc1")
    return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.BlockGrad(label),
                         mx.sym.MakeLoss(triplet_loss(fc1, per_batch_size, alpha))])


def config(run, data_dir, **overrides):
    base = dict(network="r18", image_shape=[SIDE, SIDE, 3], dataset_path=data_dir, prefix=str(run / "model"),
                per_batch_size=8, lr=0.1, lr_steps=[5], wd=0.0005, mom=0.9, frequent=2, verbose=3, ckpt=2,
                ckpt_embedding=False, seed=0, data_workers=1, data_rand_mirror=True, val_targets=["lfw"])
    base.update(overrides)
    return load_config(overrides=base)


def resume_config(run, data_dir, **overrides):
    return load_config(overrides={**config(run, data_dir, **overrides), "resume": str(run)})


def without_timings(value):
    """``value`` without the ``*_seconds`` fields (mining stopwatch) anywhere inside."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def assert_same_run(straight_dir, resumed_dir):
    s_state, s_arg, s_aux, s_opt = load_resume_state(straight_dir)
    r_state, r_arg, r_aux, r_opt = load_resume_state(resumed_dir)
    for key in ("global_step", "epoch", "nbatch", "lr", "metric"):
        assert r_state[key] == s_state[key], key
    for key in ("highest_acc", "save_step"):
        assert r_state["hooks"]["CheckpointSaver"][key] == s_state["hooks"]["CheckpointSaver"][key], key
    for name in s_arg:
        np.testing.assert_array_equal(r_arg[name].asnumpy(), s_arg[name].asnumpy(), err_msg=name)
    s_mom, r_mom = (read_state_tree(p) for p in (s_opt, r_opt))
    assert set(s_mom) == set(r_mom)
    for key in s_mom:  # SGD keeps no state without momentum (None)
        if s_mom[key] is None:
            assert r_mom[key] is None
        else:
            np.testing.assert_array_equal(r_mom[key].asnumpy(), s_mom[key].asnumpy())
    iterator_states = [without_timings(json.load(open(os.path.join(os.path.dirname(p), "iterator.json"))))
                       for p in (s_opt, r_opt)]
    assert iterator_states[0] == iterator_states[1]
    # metrics.jsonl: the resumed run's file continues the first part's records exactly (speed aside)
    records = []
    for run_dir in (straight_dir, resumed_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records.append([{k: v for k, v in json.loads(line).items() if k != "speed"} for line in f])
    assert records[1] == records[0]
    return s_state


def test_softmax_face_iter_resume_equals_straight_run(tmp_path, dataset):
    """10 steps straight vs 4 steps + --resume to 10 (6 batches per epoch: resumed mid-epoch, crosses one)."""
    straight = fit(config(tmp_path / "straight", dataset, max_steps=10), symbol=softmax_symbol())
    fit(config(tmp_path / "split", dataset, max_steps=4), symbol=softmax_symbol())
    resumed = fit(resume_config(tmp_path / "split", dataset, max_steps=10), symbol=softmax_symbol())
    assert resumed.global_step == straight.global_step == 10
    state = assert_same_run(straight.run_dir, resumed.run_dir)
    assert (state["epoch"], state["nbatch"], state["lr"]) == (1, 4, pytest.approx(0.01))
    assert state["hooks"]["CheckpointSaver"]["save_step"] == 3
    assert [r["step"] for r in resumed.metrics if "verification" in r] == [3, 6, 9]
    log = (tmp_path / "split" / "training.log").read_text()
    assert "iterator state restored at epoch 0, batch 4 (no data replayed)" in log and "replaying" not in log


class CountingFaceIter(FaceImageIter):
    """FaceImageIter that records every record it decodes and every next() call."""

    def __init__(self, *args, **kwargs):
        self.decoded, self.next_calls = [], 0
        super().__init__(*args, **kwargs)

    def _load(self, rid, params, out=None):
        self.decoded.append((self._epoch, rid))
        return super()._load(rid, params, out)

    def next(self):
        self.next_calls += 1
        return super().next()


class FirstUpdateProbe(Hook):
    """What the iterator had done when training (re)started, i.e. before the first update."""

    def before_train(self, trainer):
        self.next_calls = trainer.train_iter.next_calls


def test_resume_does_not_decode_the_skipped_batches(tmp_path, dataset):
    made = []

    def make(cfg, module, contexts):
        counting = CountingFaceIter(cfg.per_batch_size, (3, SIDE, SIDE), os.path.join(dataset, "train.rec"),
                                    shuffle=True, rand_mirror=True, seed=cfg.seed, num_workers=1)
        made.append(counting)
        return counting

    fit(config(tmp_path, dataset, max_steps=4, val_targets=[]), make_train_iter=make, symbol=softmax_symbol())
    probe = FirstUpdateProbe()
    fit(resume_config(tmp_path, dataset, max_steps=6, val_targets=[]), make_train_iter=make,
        symbol=softmax_symbol(), hooks=[probe])
    assert probe.next_calls == 0
    first, resumed = made
    skipped = [rid for epoch, rid in first.decoded if epoch == 0][:4 * 8]
    decoded_after_resume = [rid for epoch, rid in resumed.decoded if epoch == 0]
    assert len(decoded_after_resume) == 2 * 8 and not set(skipped) & set(decoded_after_resume)
    assert resumed.next_calls == 2  # batches 5 and 6 of the epoch (max_steps stops before the next call)


class CountingTripletIter(TripletFaceImageIter):
    def __init__(self, *args, **kwargs):
        self.embed_calls = 0
        super().__init__(*args, **kwargs)

    def embed(self, record_ids):
        self.embed_calls += 1
        return super().embed(record_ids)


class EmbedProbe(Hook):
    def before_train(self, trainer):
        self.embeds = trainer.train_iter.embed_calls


def test_triplet_resume_equals_straight_run_without_remining(tmp_path, dataset):
    """Triplet training (rounds of a few batches of 6, mined with the live weights); 9 steps straight vs 4 +
    --resume to 9, resumed in the middle of a round and crossing later rounds."""
    per_batch, alpha = 6, 0.5
    made = []

    def make(cfg, module, contexts):
        counting = CountingTripletIter(
            batch_size=cfg.per_batch_size, data_shape=(3, SIDE, SIDE), path_imgrec=os.path.join(dataset, "train.rec"),
            shuffle=True, rand_mirror=True, ctx_num=1, images_per_identity=cfg.images_per_identity,
            triplet_params=[cfg.triplet_bag_size, cfg.triplet_alpha, cfg.triplet_max_ap], mx_model=module,
            seed=cfg.seed, num_workers=1)
        made.append(counting)
        return counting

    def run(path, max_steps, resume=False, hooks=()):
        settings = dict(loss="triplet", per_batch_size=per_batch, triplet_alpha=alpha, images_per_identity=2,
                        triplet_bag_size=12, max_steps=max_steps, lr=0.05, mom=0.9, lr_steps=[6], verbose=2,
                        frequent=1, val_targets=[])
        cfg = (resume_config if resume else config)(path, dataset, **settings)
        import metrics
        return fit(cfg, make_train_iter=make, metrics=[metrics.LossValueMetric()],
                   symbol=triplet_symbol(per_batch, alpha), hooks=[BagStatsHook(), *hooks])

    straight = run(tmp_path / "straight", 9)
    split = run(tmp_path / "split", 4)
    assert split.state.nbatch > 0  # mid-round
    probe = EmbedProbe()
    resumed = run(tmp_path / "split", 9, resume=True, hooks=[probe])
    assert resumed.global_step == straight.global_step == 9
    assert probe.embeds == 0  # the round in progress was restored, not mined again
    state = assert_same_run(straight.run_dir, resumed.run_dir)
    assert state["epoch"] > split.state.epoch  # the runs crossed a mining round after the resume point
    bags = [json.load(open(os.path.join(d, "triplet_bags.json"))) for d in (straight.run_dir, resumed.run_dir)]
    assert without_timings(bags[0]) == without_timings(bags[1]) and len(bags[0]) >= 2
