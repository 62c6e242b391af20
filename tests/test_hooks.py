"""Hooks of the training engine: event order, user hooks added without editing the engine, stopping, hook
state across --resume; the CheckpointSaver as the only checkpoint writer (policy, best rule, retention)."""
import json
import logging
import os

import mxnet as mx
import numpy as np
import pytest

from recognition.checkpoints import CheckpointSaver, list_resume_states, load_resume_state
from recognition.config import load_config
from recognition.engine import fit
from recognition.hooks import Hook, TrainingState
from test_engine import Acc, iter_factory, make_data, run_tiny, tiny_config, tiny_symbol


class Recorder(Hook):
    """Records (event, global_step, epoch, nbatch[, targets]) for every event."""

    def __init__(self):
        self.events = []

    def _add(self, event, trainer, *extra):
        state = trainer.state
        self.events.append((event, state.global_step, state.epoch, state.nbatch, *extra))

    def before_train(self, trainer):
        self._add("before_train", trainer)

    def after_step(self, trainer):
        self._add("after_step", trainer)

    def after_verification(self, trainer, results):
        self._add("after_verification", trainer, tuple(results))

    def after_epoch(self, trainer):
        self._add("after_epoch", trainer)

    def after_train(self, trainer):
        self._add("after_train", trainer)


class StopAt(Hook):
    def __init__(self, step):
        self.step = step

    def after_step(self, trainer):
        if trainer.state.global_step == self.step:
            trainer.request_stop("enough", f"stopped by StopAt({self.step})")


class Counter(Hook):
    """Stateful user hook: steps and verifications seen, kept across --resume."""

    def __init__(self):
        self.steps = 0
        self.verifications = []

    def after_step(self, trainer):
        self.steps += 1

    def after_verification(self, trainer, results):
        self.verifications.append(trainer.state.global_step)

    def state_dict(self):
        return {"steps": self.steps, "verifications": self.verifications}

    def load_state_dict(self, state):
        self.steps, self.verifications = state["steps"], list(state["verifications"])


def test_user_hook_sees_every_event_in_order(tmp_path):
    """40 samples in batches of 8 = 5 batches per epoch; verbose=3; max_steps=7."""
    recorder = Recorder()
    x, y = make_data()
    result = fit(tiny_config(tmp_path, max_steps=7, verbose=3), make_train_iter=iter_factory(x, y),
                 metrics=[Acc()], symbol=tiny_symbol(), hooks=[recorder])
    assert result.stopped == "max_steps" and result.global_step == 7
    # after_verification is published from PeriodicVerification.after_step, so it reaches the user hook
    # before the user hook's own after_step of that step
    assert recorder.events == [
        ("before_train", 0, 0, 0),
        ("after_step", 1, 0, 1), ("after_step", 2, 0, 2),
        ("after_verification", 3, 0, 3, ()), ("after_step", 3, 0, 3),
        ("after_step", 4, 0, 4), ("after_step", 5, 0, 5), ("after_epoch", 5, 0, 5),
        ("after_verification", 6, 1, 1, ()), ("after_step", 6, 1, 1),
        ("after_step", 7, 1, 2), ("after_train", 7, 1, 2),
    ]


def test_stopping_hook_ends_training_with_final_checkpoint(tmp_path):
    recorder = Recorder()
    x, y = make_data()
    result = fit(tiny_config(tmp_path, max_steps=20, verbose=3), make_train_iter=iter_factory(x, y),
                 metrics=[Acc()], symbol=tiny_symbol(), hooks=[StopAt(4), recorder])
    assert (result.stopped, result.global_step) == ("enough", 4)
    assert recorder.events[-2:] == [("after_step", 4, 0, 4), ("after_train", 4, 0, 4)]  # later hooks saw step 4
    run = tmp_path / "run"
    assert result.final_checkpoint == str(run / "model-0000.params") and os.path.isfile(result.final_checkpoint)
    state, _, _, _ = load_resume_state(str(run))
    assert state["global_step"] == 4
    assert "training finished: stopped by StopAt(4)" in (run / "training.log").read_text()


def test_hook_state_survives_resume_and_names_are_unique(tmp_path):
    x, y = make_data()
    straight = [Counter(), Counter()]
    fit(tiny_config(tmp_path / "straight", max_steps=8, verbose=3), make_train_iter=iter_factory(x, y),
        metrics=[Acc()], symbol=tiny_symbol(), hooks=straight)
    fit(tiny_config(tmp_path / "split", max_steps=4, verbose=3), make_train_iter=iter_factory(x, y),
        metrics=[Acc()], symbol=tiny_symbol(), hooks=[Counter(), Counter()])
    resumed = [Counter(), Counter()]
    cfg = load_config(overrides={**tiny_config(tmp_path / "split", max_steps=8, verbose=3),
                                 "resume": str(tmp_path / "split" / "run")})
    fit(cfg, make_train_iter=iter_factory(x, y), metrics=[Acc()], symbol=tiny_symbol(), hooks=resumed)
    assert [(c.steps, c.verifications) for c in resumed] == [(c.steps, c.verifications) for c in straight] \
        == [(8, [3, 6])] * 2
    state, _, _, _ = load_resume_state(str(tmp_path / "split" / "run"))
    assert {"Counter", "Counter#2", "CheckpointSaver"} <= set(state["hooks"])
    assert state["hooks"]["CheckpointSaver"]["save_step"] == 2


# ------------------------------------------------------------------------------------------------- saver

class _Trainer:
    """What CheckpointSaver reads from the engine's Trainer."""

    def __init__(self, module, symbol, step):
        self.module, self.symbol = module, symbol
        self.state = TrainingState(global_step=step)
        self.config = {"prefix": "unused"}
        self.train_iter = None

    def hook_states(self):
        return {}

    def metric_state(self):
        return []


def _bound_module():
    symbol = tiny_symbol()
    module = mx.mod.Module(symbol, context=[mx.cpu()], label_names=("softmax_label",))
    module.bind(data_shapes=[("data", (8, 3, 2, 2))], label_shapes=[("softmax_label", (8,))])
    module.init_params(mx.init.Xavier())
    module.init_optimizer(optimizer="sgd")
    return module, symbol


@pytest.mark.parametrize("ckpt, files", [
    (0, []), (1, ["model-0001.params", "model-0002.params", "model-0005.params"]),
    (2, ["model-%04d.params" % n for n in range(1, 6)]), (3, ["model-0001.params"]),
])
def test_saver_applies_best_rule_and_policy(tmp_path, caplog, ckpt, files):
    """Accuracies [(0.9,0.8),(0.95,0.8),(0.8,0.8),(0.99,0.79),(0.7,0.85)]: best at verifications 1, 2, 5."""
    module, symbol = _bound_module()
    saver = CheckpointSaver(tmp_path, str(tmp_path / "model"), ckpt=ckpt, period=3, ckpt_embedding=False)
    accs = [(0.90, 0.80), (0.95, 0.80), (0.80, 0.80), (0.99, 0.79), (0.70, 0.85)]
    with caplog.at_level(logging.INFO):
        for i, (a, b) in enumerate(accs, 1):
            saver.after_verification(_Trainer(module, symbol, 3 * i), {"lfw": {"acc": a}, "agedb_30": {"acc": b}})
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".params")) == files
    lines = [r.getMessage() for r in caplog.records]
    assert "[15]Accuracy-Highest: 0.85000" in lines and "[9]Accuracy-Highest: 0.80000" in lines
    if files:  # upstream prints "saving" before "Accuracy-Highest"
        assert lines.index("saving 1") < lines.index("[3]Accuracy-Highest: 0.80000")
    assert saver.state_dict()["highest_acc"] == [1.75, 0.85] and saver.state_dict()["save_step"] == 5


def test_saver_resume_state_holds_iterator_and_hook_states_and_keeps_two(tmp_path):
    module, symbol = _bound_module()

    class Iter:
        def state_dict(self):
            return {"cursor": 3}

    saver = CheckpointSaver(tmp_path, str(tmp_path / "model"), ckpt=3, period=2)
    for step in range(1, 8):
        trainer = _Trainer(module, symbol, step)
        trainer.train_iter = Iter()
        trainer.hook_states = lambda: {"X": {"a": 1}}
        saver.after_step(trainer)
    assert [os.path.basename(p) for p in list_resume_states(tmp_path)] == ["step-0000000004", "step-0000000006"]
    resume = load_resume_state(tmp_path, symbol)
    assert resume.iterator_state() == {"cursor": 3} and resume.hook_states == {"X": {"a": 1}}
    assert resume.state["global_step"] == 6 and resume.path == saver.last_resume_state
    assert set(os.listdir(resume.path)) == {"state.json", "full.params", "optimizer.states", "symbol.json",
                                            "iterator.json"}
    assert json.loads((tmp_path / "resume" / "step-0000000006" / "iterator.json").read_text()) == {"cursor": 3}


def test_no_model_files_with_ckpt_0_but_resume_state(tmp_path):
    result = run_tiny(tmp_path, max_steps=4, ckpt=0)
    run = tmp_path / "run"
    assert result.final_checkpoint == "" and not list(run.glob("model-*.params"))
    assert os.path.isdir(result.resume_state)
    state, arg, _, _ = load_resume_state(str(run))
    assert state["global_step"] == 4 and "fc7_weight" in arg
    assert np.isfinite(arg["fc7_weight"].asnumpy()).all()
