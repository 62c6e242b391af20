"""Batch-end callbacks of the training engine, one concern each.

The engine calls every callback after each update with a :class:`BatchEnd` record, in list order:

1. :class:`NonFiniteGuard` — a NaN/inf metric or embedding raises :class:`NonFiniteError` (step named).
2. :class:`Speedometer` — insightface/MXNet's ``Epoch[%d] Batch [%d-%d]\\tSpeed: %.2f samples/sec\\tacc=%f...``
   every ``frequent`` batches, then ``reset_local()`` of the metric (``auto_reset`` as upstream).
3. :class:`LrLogger` — ``lr change to <lr>`` when the schedule moves, ``lr-batch-epoch: ...`` every 1000.
4. :class:`VerificationCallback` — every ``verbose`` global batches, each ``<target>.bin`` on the training
   Module: ``[lfw][2000]XNorm: %f`` / ``[lfw][2000]Accuracy-Flip: %1.5f+-%1.5f``.
5. :class:`HighestAccuracy` — insightface's best rule (see its docstring) and ``[2000]Accuracy-Highest``.
6. :class:`CheckpointCallback` — the ``--ckpt`` policy (:class:`CheckpointPolicy`) and the resume state.
7. :class:`MaxSteps` — raises :class:`TrainingFinished` after ``max_steps`` updates; the engine catches it,
   writes the final checkpoint and returns (never ``sys.exit``).

Callbacks share one :class:`TrainingState` (global step, best accuracies, save counter, last checkpoint);
state lives on objects, not in closure boxes.
"""
import dataclasses
import enum
import json
import logging
import math
import os
import time

import mxnet as mx
import numpy as np

logger = logging.getLogger(__name__)

LR_LOG_PERIOD = 1000  # upstream prints `lr-batch-epoch:` every 1000 global batches


class TrainingFinished(Exception):
    """Raised by a callback to end training cleanly (the engine saves a final checkpoint)."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss, metric or embedding; the message names the step and checkpoint."""


@dataclasses.dataclass
class TrainingState:
    """Mutable state shared by the callbacks and saved in the resume state.

    ``highest_acc`` is insightface's ``[sum_at_last_tie, best_last_target_accuracy]``.
    """
    global_step: int = 0
    epoch: int = 0
    nbatch: int = 0                     # batches done in the current epoch
    lr: float = 0.0
    highest_acc: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])
    save_step: int = 0
    is_highest: bool = False
    verification: dict = None           # {target: {"acc": ..., "std": ..., "xnorm": ...}} of this step
    verified_step: int = -1
    last_checkpoint: str = ""           # newest insightface params file written
    last_resume_state: str = ""         # newest resume-state directory written

    def to_json(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("verification", "is_highest")}


@dataclasses.dataclass
class BatchEnd:
    """What a callback sees after an update (``nbatch`` is 0-based within the epoch, as Module.fit)."""
    epoch: int
    nbatch: int
    eval_metric: object
    module: object
    state: TrainingState


class MetricsLog:
    """Append JSON records (one per line) to ``metrics.jsonl``; each write is flushed."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.records = []

    def write(self, record):
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


class Speedometer:
    """MXNet's ``Speedometer(batch_size, frequent, auto_reset=True)`` with a record sink.

    Speed = ``frequent * batch_size / seconds`` since the previous report (global samples/s).
    """

    def __init__(self, batch_size, frequent, sink=None):
        self.batch_size = batch_size
        self.frequent = frequent
        self.sink = sink
        self.tic = None
        self.last_count = -1

    def __call__(self, param):
        count = param.nbatch
        if self.last_count > count:
            self.tic = None
        self.last_count = count
        if self.tic is None:
            self.tic = time.time()
            return
        if count % self.frequent:
            return
        speed = self.frequent * self.batch_size / max(time.time() - self.tic, 1e-9)
        name_value = param.eval_metric.get_name_value() if param.eval_metric is not None else []
        if param.eval_metric is not None:
            param.eval_metric.reset_local()
        msg = "Epoch[%d] Batch [%d-%d]\tSpeed: %.2f samples/sec" + "\t%s=%f" * len(name_value)
        logger.info(msg, param.epoch, count - self.frequent, count, speed, *sum(name_value, ()))
        if self.sink is not None:
            record = {"step": param.state.global_step, "epoch": param.epoch, "lr": param.state.lr,
                      "speed": speed}
            record.update({name: value for name, value in name_value})
            self.sink.write(record)
        self.tic = time.time()


def _leaf_metrics(metric):
    if metric is None:
        return []
    children = getattr(metric, "metrics", None)
    if isinstance(children, list):
        return [leaf for child in children for leaf in _leaf_metrics(child)]
    return [metric]


class NonFiniteGuard:
    """Stop on a non-finite metric value or embedding output (insightface pain point: silent NaN runs).

    Checks the metric's running (local) values and ``module.get_outputs()[0]`` after every update.
    """

    def __call__(self, param):
        bad = []
        for leaf in _leaf_metrics(param.eval_metric):
            if leaf.num_inst == 0:  # just reset by the Speedometer: 0/0, not a training failure
                continue
            bad += [f"{n}={v}" for n, v in leaf.get_name_value() if isinstance(v, float) and not math.isfinite(v)]
        outputs = param.module.get_outputs()
        if outputs and not np.isfinite(outputs[0].asnumpy()).all():
            bad.append("embedding output has NaN/inf")
        if bad:
            ckpt = param.state.last_resume_state or param.state.last_checkpoint or "none written yet"
            raise NonFiniteError(
                f"non-finite training values at global step {param.state.global_step} "
                f"(epoch {param.epoch}, batch {param.nbatch}): {', '.join(bad)}. Training stopped; the last good "
                f"checkpoint is intact: {ckpt}. Lower --lr, add --warmup-steps, or pre-train with --loss softmax.")


class LrLogger:
    """Log ``lr change to <lr>`` when the learning rate moves, and ``lr-batch-epoch:`` every 1000 batches."""

    def __init__(self):
        self.last_lr = None

    def __call__(self, param):
        lr = param.state.lr
        if self.last_lr is not None and lr != self.last_lr:
            logger.info("lr change to %s", lr)
        self.last_lr = lr
        if param.state.global_step % LR_LOG_PERIOD == 0:
            logger.info("lr-batch-epoch: %s %d %d", lr, param.nbatch, param.epoch)


class VerificationCallback:
    """Every ``period`` global batches, verify each pack on the training Module (insightface §8.7).

    Parameters
    ----------
    ver_sets : list of (name, data_set) with data_set from ``eval.verification.load_bin``
    batch_size : int, the global batch the training Module is bound with
    period : int, ``verbose``
    test_fn : ``eval.verification.test`` (injectable); must return ``(acc1, std1, acc2, std2, xnorm, emb)``
    sink : MetricsLog or None
    """

    def __init__(self, ver_sets, batch_size, period, test_fn, nfolds=10, sink=None):
        self.ver_sets = list(ver_sets)
        self.batch_size = batch_size
        self.period = period
        self.test_fn = test_fn
        self.nfolds = nfolds
        self.sink = sink

    def run(self, module, step):
        # Let pending optimizer updates finish before inference forwards on the same executors: with MKLDNN
        # (and fast PReLU) an is_train=False forward racing the update was seen to fail ("could not create a
        # primitive descriptor for a sum primitive").
        mx.nd.waitall()
        results = {}
        for name, data_set in self.ver_sets:
            _, _, acc2, std2, xnorm, _ = self.test_fn(data_set, module, self.batch_size, self.nfolds)
            logger.info("[%s][%d]XNorm: %f", name, step, xnorm)
            logger.info("[%s][%d]Accuracy-Flip: %1.5f+-%1.5f", name, step, acc2, std2)
            results[name] = {"acc": float(acc2), "std": float(std2), "xnorm": float(xnorm)}
        return results

    def __call__(self, param):
        step = param.state.global_step
        if step % self.period:
            return
        results = self.run(param.module, step)
        param.state.verification = results
        param.state.verified_step = step
        if self.sink is not None and results:
            self.sink.write({"step": step, "epoch": param.epoch, "verification": results})


class HighestAccuracy:
    """insightface's best-model rule on each verification step (reproduced, including its quirks).

    With ``acc`` the accuracies in target order and ``highest = [sum_at_tie, best_last]`` (both 0 at start):
    if ``acc[-1] > best_last`` -> best (``sum_at_tie`` is NOT updated); if ``acc[-1] == best_last`` and
    ``sum(acc) >= sum_at_tie`` -> best and ``sum_at_tie = sum(acc)``; then ``best_last = max``. So "best" is
    judged on the LAST target (agedb_30 by default, not lfw) and the tie-break compares with a stale sum.
    Logs ``[step]Accuracy-Highest: %1.5f``.
    """

    def __call__(self, param):
        state = param.state
        state.is_highest = False
        if state.verified_step != state.global_step:
            return
        accs = [r["acc"] for r in (state.verification or {}).values()]
        if accs:
            score = sum(accs)
            if accs[-1] >= state.highest_acc[-1]:
                if accs[-1] > state.highest_acc[-1]:
                    state.is_highest = True
                elif score >= state.highest_acc[0]:
                    state.is_highest = True
                    state.highest_acc[0] = score
                state.highest_acc[-1] = accs[-1]
        logger.info("[%d]Accuracy-Highest: %1.5f", state.global_step, state.highest_acc[-1])


class CheckpointPolicy(enum.IntEnum):
    """insightface ``--ckpt`` modes, evaluated at each verification step.

    NONE (0): never write model files. BEST (1): on a new best, save with number = verification count.
    ALWAYS (2): save at every verification with number = verification count. BEST_OVERWRITE (3, HEAD
    default): on a new best, save into slot 1.
    """
    NONE = 0
    BEST = 1
    ALWAYS = 2
    BEST_OVERWRITE = 3

    def decide(self, is_highest, save_step):
        """-> checkpoint number to write, or None."""
        if self is CheckpointPolicy.NONE:
            return None
        if self is CheckpointPolicy.ALWAYS:
            return save_step
        if not is_highest:
            return None
        return 1 if self is CheckpointPolicy.BEST_OVERWRITE else save_step


class CheckpointCallback:
    """Apply the checkpoint policy on verification steps and write the resume state every ``period`` steps.

    ``checkpointer`` provides ``save_model(number) -> path`` and ``save_resume() -> path``.
    """

    def __init__(self, policy, checkpointer, period):
        self.policy = CheckpointPolicy(policy)
        self.checkpointer = checkpointer
        self.period = period

    def __call__(self, param):
        state = param.state
        if state.global_step % self.period:
            return
        state.save_step += 1
        number = self.policy.decide(state.is_highest, state.save_step)
        if number is not None:
            logger.info("saving %d", number)
            state.last_checkpoint = self.checkpointer.save_model(number)
        state.last_resume_state = self.checkpointer.save_resume()


class MaxSteps:
    """Raise :class:`TrainingFinished` once ``max_steps`` updates are done (0 = no limit).

    insightface exits after update ``max_steps + 1`` (``mbatch > max_steps``); here exactly ``max_steps``
    updates run, which is what the name promises.
    """

    def __init__(self, max_steps):
        self.max_steps = max_steps

    def __call__(self, param):
        if self.max_steps and param.state.global_step >= self.max_steps:
            raise TrainingFinished(f"max_steps={self.max_steps} reached")
