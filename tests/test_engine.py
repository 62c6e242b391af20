"""Training engine: hooks, optimizer semantics, data parallel, NaN guard, resume, verification on live weights.

Most tests use a tiny hand-made symbol with insightface's output contract (``fc1`` embedding, ``fc7``
classifier, SoftmaxOutput 'valid') and ``mx.io.NDArrayIter`` so they run in a fraction of a second; the
end-to-end ones (real r18 symbol, FaceImageIter, .bin verification) are marked slow.
"""
import json
import logging

import mxnet as mx
import numpy as np
import pytest

from recognition import hooks
from recognition.checkpoints import CheckpointPolicy, HighestAccuracy, load_resume_state
from recognition.config import load_config
from recognition.engine import fit
from recognition.hooks import TrainingState

NUM_CLASSES, SIDE, EMB = 4, 2, 5
FEAT = 3 * SIDE * SIDE


def tiny_symbol(fc7_lr_mult=None):
    """data (B,3,SIDE,SIDE) -> fc1 (EMB) -> fc7 (NUM_CLASSES) -> SoftmaxOutput; no BatchNorm (so data parallel
    over contexts is exactly equivalent to one context), deterministic."""
    data = mx.sym.var("data")
    label = mx.sym.var("softmax_label")
    fc1 = mx.sym.FullyConnected(mx.sym.flatten(data), num_hidden=EMB, name="fc1")
    attrs = {"__lr_mult__": str(fc7_lr_mult)} if fc7_lr_mult is not None else None
    fc7_weight = mx.sym.var("fc7_weight", attr=attrs)
    fc7 = mx.sym.FullyConnected(fc1, weight=fc7_weight, num_hidden=NUM_CLASSES, name="fc7")
    return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7, label, normalization="valid",
                                                                     name="softmax")])


class Acc(mx.metric.EvalMetric):
    """Minimal AccMetric stand-in (preds[1] argmax vs labels[0]) so these tests do not depend on metrics/."""

    def __init__(self):
        super().__init__("acc")

    def update(self, labels, preds):
        pred = preds[1].asnumpy().argmax(axis=1)
        self.sum_metric += float((pred == labels[0].asnumpy()).sum())
        self.num_inst += len(pred)


def make_data(n=40, seed=0, nan_at=None):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 3, SIDE, SIDE).astype(np.float32)
    y = rng.randint(0, NUM_CLASSES, n).astype(np.float32)
    if nan_at is not None:
        x[nan_at] = np.nan
    return x, y


def iter_factory(x, y):
    def make(cfg, module, contexts):
        return mx.io.NDArrayIter(x, y, batch_size=cfg.per_batch_size * len(contexts), label_name="softmax_label")
    return make


def tiny_config(tmp_path, **overrides):
    base = dict(network="r18", num_classes=NUM_CLASSES, image_shape=[SIDE, SIDE, 3], per_batch_size=8, lr=0.1,
                lr_steps=[4], wd=0.0005, mom=0.9, max_steps=6, frequent=2, verbose=3, val_targets=[],
                dataset_path=str(tmp_path / "nodata"), prefix=str(tmp_path / "run" / "model"), ckpt=2,
                ckpt_embedding=False, seed=0)
    base.update(overrides)
    return load_config(overrides=base)


def run_tiny(tmp_path, x=None, y=None, symbol=None, **overrides):
    if x is None:
        x, y = make_data()
    cfg = tiny_config(tmp_path, **overrides)
    return fit(cfg, make_train_iter=iter_factory(x, y), metrics=[Acc()],
               symbol=symbol if symbol is not None else tiny_symbol())


# ------------------------------------------------------------------------------------------------- hooks

class _Trainer:
    """The attributes of :class:`recognition.engine.Trainer` the hooks under test read."""

    def __init__(self, state, metric=None, metrics_log=None):
        self.state, self.metric, self.metrics_log = state, metric, metrics_log
        self.stop_reason = None

    def request_stop(self, reason, message=None):
        self.stop_reason = reason


def test_highest_accuracy_reproduces_upstream_rule():
    """Hand-traced upstream semantics: best on the LAST target, tie broken by a stale sum."""
    rule = HighestAccuracy()
    outcomes = []
    for accs in [(0.90, 0.80), (0.95, 0.80), (0.80, 0.80), (0.99, 0.79), (0.70, 0.85)]:
        outcomes.append((rule.update(accs), tuple(rule.highest_acc)))
    assert outcomes == [
        (True, (0.0, 0.80)),     # 0.80 > 0: best; the sum is NOT recorded (upstream)
        (True, (1.75, 0.80)),    # tie on the last target, 1.75 >= 0.0 (stale sum): best, sum recorded
        (False, (1.75, 0.80)),   # tie, 1.60 < 1.75
        (False, (1.75, 0.80)),   # last target dropped, even though lfw-like first target rose
        (True, (1.75, 0.85)),    # strictly higher last target
    ]
    assert rule.update([]) is False and rule.best == 0.85  # no target pack: never best


@pytest.mark.parametrize("policy, is_highest, save_step, expected", [
    (0, True, 3, None), (1, True, 3, 3), (1, False, 3, None), (2, False, 3, 3), (3, True, 3, 1), (3, False, 3, None),
])
def test_checkpoint_policy_modes(policy, is_highest, save_step, expected):
    assert CheckpointPolicy(policy).decide(is_highest, save_step) == expected


def test_speedometer_line_and_reset(caplog):
    metric = Acc()
    metric.sum_metric, metric.num_inst = 3.0, 4
    state = TrainingState(global_step=4, lr=0.1)
    sink_records = []

    class Sink:
        def write(self, record):
            sink_records.append(record)
    meter = hooks.Speedometer(batch_size=16, frequent=2)
    trainer = _Trainer(state, metric, Sink())
    with caplog.at_level(logging.INFO):
        for nbatch in (1, 2, 3):  # batches done in the epoch (0-based batch 0, 1, 2)
            state.nbatch = nbatch
            meter.after_step(trainer)
    lines = [r.getMessage() for r in caplog.records if "Speed" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("Epoch[0] Batch [0-2]\tSpeed: ") and lines[0].endswith("samples/sec\tacc=0.750000")
    assert metric.num_inst == 0  # auto_reset (reset_local)
    assert sink_records[0]["acc"] == 0.75 and sink_records[0]["step"] == 4 and sink_records[0]["lr"] == 0.1


def test_max_steps_requests_stop():
    trainer = _Trainer(TrainingState(global_step=4))
    hooks.MaxSteps(5).after_step(trainer)
    assert trainer.stop_reason is None
    trainer.state.global_step = 5
    hooks.MaxSteps(0).after_step(trainer)
    assert trainer.stop_reason is None
    hooks.MaxSteps(5).after_step(trainer)
    assert trainer.stop_reason == "max_steps"


# ------------------------------------------------------------------------------------------------- engine

def _sgd_reference(x, y, arg0, steps, batch, lr_at, mom, wd):
    """numpy SGD-with-momentum on the tiny net (softmax CE mean over the batch, MXNet's update rule)."""
    w1, b1, w7, b7 = (arg0[k].copy() for k in ("fc1_weight", "fc1_bias", "fc7_weight", "fc7_bias"))
    moms = [np.zeros_like(a) for a in (w1, b1, w7, b7)]
    n = len(x)
    for t in range(steps):
        i0 = (t * batch) % n
        xb, yb = x[i0:i0 + batch].reshape(batch, -1), y[i0:i0 + batch].astype(int)
        h = xb @ w1.T + b1
        z = h @ w7.T + b7
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = (p - np.eye(NUM_CLASSES)[yb]) / batch
        grads = [(dz @ w7).T @ xb, (dz @ w7).sum(0), dz.T @ h, dz.sum(0)]
        lr = lr_at(t + 1)
        for k, (param, g) in enumerate(zip((w1, b1, w7, b7), grads)):
            moms[k][:] = mom * moms[k] - lr * (g + wd * param)
            param += moms[k]
    return {"fc1_weight": w1, "fc1_bias": b1, "fc7_weight": w7, "fc7_bias": b7}


def test_fit_writes_run_files_log_lines_and_lr_records(tmp_path):
    x, y = make_data()
    result = run_tiny(tmp_path, x, y, max_steps=6)
    assert result.global_step == 6 and result.stopped == "max_steps"
    run = tmp_path / "run"
    for name in ("training.log", "metrics.jsonl", "config.json", "model-symbol.json", "model-0000.params",
                 "model-0001.params", "model-0002.params", "training_curves.png"):
        assert (run / name).is_file(), name
    _, arg, _ = mx.model.load_checkpoint(str(run / "model"), 0)
    state, _, _, _ = load_resume_state(str(run))
    assert state["global_step"] == 6
    assert set(arg) == {"fc1_weight", "fc1_bias", "fc7_weight", "fc7_bias"}  # ckpt_embedding=False keeps fc7
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "speed" in r] == [3, 5]  # frequent=2 within 5-batch epochs
    assert [r["lr"] for r in records if "speed" in r] == pytest.approx([0.1, 0.01])
    log = (run / "training.log").read_text()
    assert "Epoch[0] Batch [0-2]\tSpeed:" in log and "saving 1" in log and "[3]Accuracy-Highest: 0.00000" in log


def _write_start(tmp_path, seed=1):
    """Known initial weights as a pretrained checkpoint ``start-0000.params``; returns them as numpy."""
    rng = np.random.RandomState(seed)
    start = {"fc1_weight": rng.randn(EMB, FEAT) * 0.3, "fc1_bias": rng.randn(EMB) * 0.1,
             "fc7_weight": rng.randn(NUM_CLASSES, EMB) * 0.3, "fc7_bias": rng.randn(NUM_CLASSES) * 0.1}
    start = {k: v.astype(np.float32) for k, v in start.items()}
    mx.nd.save(str(tmp_path / "start-0000.params"), {f"arg:{k}": mx.nd.array(v) for k, v in start.items()})
    return start


def test_update_equals_numpy_reference(tmp_path):
    """SGD(lr, momentum, wd on every param, rescale 1/G) with lr x0.1 after global batch 4 == numpy loop."""
    x, y = make_data()
    start = _write_start(tmp_path)
    result = run_tiny(tmp_path, x, y, max_steps=7, lr_steps=[4], pretrained=f"{tmp_path}/start,0")
    _, got, _, _ = load_resume_state(result.run_dir)
    ref = _sgd_reference(x, y, start, 7, 8, lambda u: 0.1 if u <= 4 else 0.01, 0.9, 0.0005)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name].asnumpy(), value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_param_mults_ignored_by_default_honoured_on_request(tmp_path):
    """insightface quirk (train.py builds SGD without sym=): lr_mult=0 on fc7_weight has no effect unless honour_param_mults."""
    x, y = make_data()
    start = _write_start(tmp_path)
    common = dict(symbol=tiny_symbol(fc7_lr_mult=0.0), max_steps=3, pretrained=f"{tmp_path}/start,0")
    faithful = run_tiny(tmp_path / "a", x, y, **common)
    honoured = run_tiny(tmp_path / "b", x, y, honour_param_mults=True, **common)
    _, wa, _, _ = load_resume_state(faithful.run_dir)
    _, wb, _, _ = load_resume_state(honoured.run_dir)
    assert np.abs(wa["fc7_weight"].asnumpy() - start["fc7_weight"]).max() > 1e-3
    np.testing.assert_array_equal(wb["fc7_weight"].asnumpy(), start["fc7_weight"])


def test_two_cpu_contexts_equal_one_with_same_global_batch(tmp_path):
    x, y = make_data()
    one = run_tiny(tmp_path / "one", x, y, per_batch_size=8, max_steps=5)
    two = run_tiny(tmp_path / "two", x, y, per_batch_size=4, ctx="cpu:2", max_steps=5)
    _, w1, _, _ = load_resume_state(one.run_dir)
    _, w2, _, _ = load_resume_state(two.run_dir)
    for name in w1:
        np.testing.assert_allclose(w1[name].asnumpy(), w2[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_nan_stops_with_step_and_intact_checkpoint(tmp_path):
    x, y = make_data(nan_at=33)  # sample 33 is in global batch 5 (batches of 8)
    with pytest.raises(hooks.NonFiniteError) as err:
        run_tiny(tmp_path, x, y, max_steps=20)
    message = str(err.value)
    assert "global step 5" in message and "step-0000000003" in message
    state, arg, _, _ = load_resume_state(str(tmp_path / "run"))
    assert state["global_step"] == 3 and all(np.isfinite(v.asnumpy()).all() for v in arg.values())
    mx.model.load_checkpoint(str(tmp_path / "run" / "model"), 1)
    assert "non-finite training values at global step 5" in (tmp_path / "run" / "training.log").read_text()


def test_resume_equals_straight_run(tmp_path):
    """8 steps straight vs 3 steps, stop, --resume to 8 (mid-epoch): same step, lr, momentum and weights."""
    x, y = make_data()
    straight = run_tiny(tmp_path / "straight", x, y, max_steps=8, lr_steps=[5])
    run_tiny(tmp_path / "split", x, y, max_steps=3, lr_steps=[5])
    cfg = load_config(overrides={**tiny_config(tmp_path / "split", max_steps=8, lr_steps=[5]),
                                 "resume": str(tmp_path / "split" / "run")})
    resumed = fit(cfg, make_train_iter=iter_factory(x, y), metrics=[Acc()], symbol=tiny_symbol())
    assert resumed.global_step == straight.global_step == 8
    s_state, s_arg, s_aux, s_opt = load_resume_state(straight.run_dir)
    r_state, r_arg, r_aux, r_opt = load_resume_state(resumed.run_dir)
    assert r_state["lr"] == pytest.approx(s_state["lr"]) == pytest.approx(0.01)
    assert (r_state["epoch"], r_state["nbatch"]) == (s_state["epoch"], s_state["nbatch"]) == (1, 3)
    for name in s_arg:
        np.testing.assert_allclose(r_arg[name].asnumpy(), s_arg[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert open(s_opt, "rb").read() == open(r_opt, "rb").read() or _same_momentum(s_opt, r_opt)
    log = (tmp_path / "split" / "run" / "training.log").read_text()
    assert "resuming" in log and "from global step 3" in log
    assert "has no iterator state (the iterator had no state_dict()); replaying the data order" in log  # NDArrayIter
    jsonl = (tmp_path / "split" / "run" / "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in jsonl.splitlines()]
    assert steps == sorted(steps)
    other = tiny_symbol()
    other = mx.sym.Group([other[0], mx.sym.FullyConnected(other[0], num_hidden=2, name="extra")])
    with pytest.raises(ValueError, match="training symbol's parameters differ"):
        fit(cfg, make_train_iter=iter_factory(x, y), metrics=[Acc()], symbol=other)


def _same_momentum(path_a, path_b):
    import pickle
    a, b = pickle.loads(open(path_a, "rb").read()), pickle.loads(open(path_b, "rb").read())
    return all(np.allclose(a[k].asnumpy(), b[k].asnumpy(), atol=1e-6) for k in a)


def test_num_classes_mismatch_with_property_is_an_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "property").write_text("10,112,112\n")
    cfg = load_config(overrides={"dataset_path": str(data), "num_classes": 7, "prefix": str(tmp_path / "r" / "m")})
    from recognition.config import ConfigError
    with pytest.raises(ConfigError, match=r"num_classes=7 but .*property says 10"):
        fit(cfg)
