"""Training hooks: the extension points of :func:`recognition.engine.fit` (modelled on detectron2's HookBase).

A hook subclasses :class:`Hook` and overrides the events it needs; every event receives the
:class:`recognition.engine.Trainer`, which exposes ``config``, ``run_dir``, ``module``, ``symbol``,
``train_iter``, ``metric``, ``optimizer``, ``state`` (:class:`TrainingState`: ``global_step``, ``epoch``,
``nbatch``, ``lr``), ``metrics_log`` (the ``metrics.jsonl`` sink) and ``request_stop(reason)``.

Events and their order guarantees
---------------------------------
``before_train(trainer)``
    Once, after the Module is bound and initialised, the optimizer built and a resume state (parameters,
    optimizer, iterator position, hook states) loaded; before the first update.
``after_step(trainer)``
    After every update (``forward_backward`` + ``update`` + metric update), with ``state.global_step``
    already counting it and ``state.nbatch`` = batches done in the epoch.
``after_verification(trainer, results)``
    Published by :class:`PeriodicVerification` from its ``after_step`` every ``verbose`` updates (also when
    no target pack exists: ``results`` is then empty, as upstream still counts the save step).
    ``results`` is ``{target: {"acc", "std", "xnorm"}}`` in target order (flip accuracy, as upstream).
``after_epoch(trainer)``
    When the iterator is exhausted, before ``train_iter.reset()``; ``state.epoch`` is the finished epoch.
``after_train(trainer)``
    Once, when training ends normally (``max_steps``, ``end_epoch`` or ``request_stop``); not after an
    exception (e.g. :class:`NonFiniteError`), so nothing is saved from a failed run.

Hooks run in list order for every event: the default hooks :class:`NonFiniteGuard`, :class:`Speedometer`,
:class:`LrLogger`, :class:`PeriodicVerification`, :class:`MaxSteps`, then the user's ``hooks=`` in the order
given, then :class:`recognition.checkpoints.CheckpointSaver` last, so that the resume state it writes after
step N holds every hook's state after step N. A hook stops training with ``trainer.request_stop(reason)``:
the current step still reaches every hook, then ``after_train`` runs and :func:`fit` returns with
``stopped == reason``. Hooks with state to keep across ``--resume`` return a JSON-serialisable dict from
``state_dict()`` (saved in ``state.json`` of every resume state under the hook's ``name``) and get it back
through ``load_state_dict`` before ``before_train``.

insightface puts all of this in one ``_batch_callback`` closure of ``train_net``
(``recognition/arcface_mxnet/train.py``; ``src/train_softmax.py``); the log lines are kept exactly.
"""
import dataclasses
import json
import logging
import math
import os
import time

import mxnet as mx
import numpy as np

logger = logging.getLogger(__name__)

LR_LOG_PERIOD = 1000  # upstream prints `lr-batch-epoch:` every 1000 global batches


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss, metric or embedding; the message names the step and checkpoint."""


@dataclasses.dataclass
class TrainingState:
    """Where training is: saved at the top level of ``state.json`` in every resume state."""
    global_step: int = 0
    epoch: int = 0
    nbatch: int = 0                     # batches done in the current epoch
    lr: float = 0.0

    def to_json(self):
        return dataclasses.asdict(self)


class Hook:
    """Base class of training hooks: every event is a no-op (see the module docstring for the order).

    ``name`` keys the hook's state in the resume state (the class name; the trainer appends ``#2``, ``#3``
    to repeated names). ``state_dict()`` returns None (nothing to save) unless overridden.
    """

    @property
    def name(self):
        return type(self).__name__

    def before_train(self, trainer):
        pass

    def after_step(self, trainer):
        pass

    def after_verification(self, trainer, results):
        pass

    def after_epoch(self, trainer):
        pass

    def after_train(self, trainer):
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


class MetricsLog:
    """Append JSON records (one per line) to ``metrics.jsonl``; each write is flushed."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.records = []

    def write(self, record):
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


class Speedometer(Hook):
    """MXNet's ``Speedometer(batch_size, frequent, auto_reset=True)`` writing records to ``metrics.jsonl``.

    ``Epoch[%d] Batch [%d-%d]\\tSpeed: %.2f samples/sec\\tacc=%f...`` every ``frequent`` batches of an epoch
    (not at its first batch), speed = ``frequent * batch_size / seconds`` since the previous report (global
    samples/s), then ``reset_local()`` of the metric. Resumed mid-epoch (the metric's running sums are part of
    the resume state), it reports at the batches a straight run reports at, timing from ``before_train``.
    """

    def __init__(self, batch_size, frequent):
        self.batch_size = batch_size
        self.frequent = frequent
        self.tic = None
        self.last_count = -1

    def before_train(self, trainer):
        if trainer.state.nbatch:
            self.tic = time.time()
            self.last_count = trainer.state.nbatch - 1

    def after_step(self, trainer):
        count = trainer.state.nbatch - 1  # 0-based batch index, as Module.fit's BatchEndParam.nbatch
        if self.last_count > count:
            self.tic = None
        self.last_count = count
        if self.tic is None:
            self.tic = time.time()
            return
        if count % self.frequent:
            return
        speed = self.frequent * self.batch_size / max(time.time() - self.tic, 1e-9)
        metric = trainer.metric
        name_value = metric.get_name_value() if metric is not None else []
        if metric is not None:
            metric.reset_local()
        msg = "Epoch[%d] Batch [%d-%d]\tSpeed: %.2f samples/sec" + "\t%s=%f" * len(name_value)
        logger.info(msg, trainer.state.epoch, count - self.frequent, count, speed, *sum(name_value, ()))
        if trainer.metrics_log is not None:
            record = {"step": trainer.state.global_step, "epoch": trainer.state.epoch, "lr": trainer.state.lr,
                      "speed": speed}
            record.update({name: value for name, value in name_value})
            trainer.metrics_log.write(record)
        self.tic = time.time()


def leaf_metrics(metric):
    """The leaf metrics of a (possibly composite) ``mx.metric.EvalMetric``, in order."""
    if metric is None:
        return []
    children = getattr(metric, "metrics", None)
    if isinstance(children, list):
        return [leaf for child in children for leaf in leaf_metrics(child)]
    return [metric]


class NonFiniteGuard(Hook):
    """Stop on a non-finite metric value or embedding output (upstream trains on silently after a NaN).

    Checks the metric's running (local) values and ``module.get_outputs()[0]`` after every update and raises
    :class:`NonFiniteError`. ``last_good()`` (optional callable) names the newest checkpoint for the message.
    """

    def __init__(self, last_good=None):
        self.last_good = last_good

    def after_step(self, trainer):
        bad = []
        for leaf in leaf_metrics(trainer.metric):
            if leaf.num_inst == 0:  # just reset by the Speedometer: 0/0, not a training failure
                continue
            bad += [f"{n}={v}" for n, v in leaf.get_name_value() if isinstance(v, float) and not math.isfinite(v)]
        outputs = trainer.module.get_outputs()
        if outputs and not np.isfinite(outputs[0].asnumpy()).all():
            bad.append("embedding output has NaN/inf")
        if bad:
            state = trainer.state
            ckpt = (self.last_good() if self.last_good is not None else "") or "none written yet"
            raise NonFiniteError(
                f"non-finite training values at global step {state.global_step} "
                f"(epoch {state.epoch}, batch {state.nbatch - 1}): {', '.join(bad)}. Training stopped; the last "
                f"good checkpoint is intact: {ckpt}. Lower --lr, add --warmup-steps, or pre-train with --loss "
                "softmax.")


class LrLogger(Hook):
    """Log ``lr change to <lr>`` when the learning rate moves, and ``lr-batch-epoch:`` every 1000 batches."""

    def __init__(self):
        self.last_lr = None

    def after_step(self, trainer):
        state = trainer.state
        if self.last_lr is not None and state.lr != self.last_lr:
            logger.info("lr change to %s", state.lr)
        self.last_lr = state.lr
        if state.global_step % LR_LOG_PERIOD == 0:
            logger.info("lr-batch-epoch: %s %d %d", state.lr, state.nbatch - 1, state.epoch)


class PeriodicVerification(Hook):
    """Every ``period`` global batches, verify each pack on the training Module and publish the results.

    insightface ``train_net.ver_test``: ``[lfw][2000]XNorm: %f`` and ``[lfw][2000]Accuracy-Flip: %1.5f+-%1.5f``
    per target, a ``{"step", "epoch", "verification"}`` record in ``metrics.jsonl``, then
    ``after_verification(trainer, results)`` on every hook (also with no pack: ``results == {}``).

    Parameters
    ----------
    ver_sets : list of (name, data_set) with data_set from ``eval.verification.load_bin``
    batch_size : int, the global batch the training Module is bound with
    period : int, ``verbose``
    test_fn : ``eval.verification.test`` (injectable); returns ``(acc1, std1, acc2, std2, xnorm, emb)``
    """

    def __init__(self, ver_sets, batch_size, period, test_fn, nfolds=10):
        self.ver_sets = list(ver_sets)
        self.batch_size = batch_size
        self.period = period
        self.test_fn = test_fn
        self.nfolds = nfolds

    def run(self, module, step):
        """``{target: {"acc", "std", "xnorm"}}`` of the Module's current weights, logged as upstream."""
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

    def after_step(self, trainer):
        step = trainer.state.global_step
        if step % self.period:
            return
        results = self.run(trainer.module, step)
        if trainer.metrics_log is not None and results:
            trainer.metrics_log.write({"step": step, "epoch": trainer.state.epoch, "verification": results})
        bad = [f"[{name}] {key}={value}" for name, r in results.items() for key, value in r.items()
               if not math.isfinite(value)]
        if bad:  # NaN embeddings: nothing is saved from these weights (upstream saved them as "best")
            raise NonFiniteError(
                f"non-finite verification result at global step {step}: {', '.join(bad)}. Training stopped; no "
                "checkpoint is written from these weights. Lower --lr, add --warmup-steps, or pre-train with "
                "--loss softmax.")
        trainer.publish_verification(results)


class MaxSteps(Hook):
    """Stop training once ``max_steps`` updates are done (0 = no limit).

    insightface exits with ``sys.exit(0)`` after update ``max_steps + 1`` (``mbatch > max_steps``), so
    without a final checkpoint; here exactly ``max_steps`` updates run, then ``after_train`` saves.
    """

    def __init__(self, max_steps):
        self.max_steps = max_steps

    def _check(self, trainer, when):
        if self.max_steps and trainer.state.global_step >= self.max_steps:
            trainer.request_stop("max_steps", f"max_steps={self.max_steps} {when}")

    def before_train(self, trainer):
        self._check(trainer, "already reached")

    def after_step(self, trainer):
        self._check(trainer, "reached")
