"""The training engine shared by ``train_softmax`` and ``train_triplet``: :func:`fit` and :class:`Trainer`.

``fit(config, make_train_iter=None, metrics=None, symbol=None, hooks=None) -> FitResult``

* ``config``: a config from :func:`recognition.config.load_config` / ``parse_args`` (validated again here).
* ``make_train_iter(config, module, contexts) -> mx.io.DataIter`` is called AFTER the training Module is
  bound and its parameters initialised (the triplet iterator embeds its bags with the live weights); the
  default builds ``iterators.FaceImageIter`` on ``<dataset_path>/train.rec`` with global batch
  ``per_batch_size * len(contexts)``. The iterator must yield ``data`` (B, 3, H, W) and ``softmax_label`` (B,);
  the engine calls its ``close()`` (if any) when training ends.
* ``metrics``: list of ``mx.metric.EvalMetric`` (default ``[AccMetric]`` + ``LossValueMetric`` if ``ce_loss``).
* ``symbol``: optional training symbol overriding ``symbols.get_symbol(config)`` (same output contract:
  outputs[0] is the embedding; used by tests and custom heads).
* ``hooks``: :class:`recognition.hooks.Hook` instances (events, order and stopping: see that module).

One step (insightface ``train_net``, ``recognition/arcface_mxnet/train.py``): ``forward_backward`` on the
global batch (sliced over the contexts by Module), ``update`` with ``SGD(lr, momentum, wd, rescale_grad=1/G)``
and ``MultiFactorScheduler(lr_steps, 0.1)`` (lr x0.1 from the update after global batch ``step``, as
upstream's ``opt.lr *= 0.1`` when ``mbatch == step``), metric update, then ``after_step`` of every hook.
Upstream builds its SGD without ``sym=``, so ``lr_mult``/``wd_mult`` are ignored and wd applies to every
parameter: reproduced unless ``honour_param_mults``.

Hooks, in call order: :class:`~recognition.hooks.NonFiniteGuard`, :class:`~recognition.hooks.Speedometer`,
:class:`~recognition.hooks.LrLogger`, :class:`~recognition.hooks.PeriodicVerification`,
:class:`~recognition.hooks.MaxSteps`, the user's ``hooks``, :class:`recognition.checkpoints.CheckpointSaver`
(the only writer of checkpoint files: ``--ckpt`` policy, final ``prefix-0000.params``, resume states).

``--resume <run_dir>`` restores parameters (incl. fc7), optimizer states, position, lr, hook states and the
iterator position (``train_iter.load_state_dict``: nothing is decoded or re-mined; iterators without it are
replayed up to the saved batch). Also shared by every trainer: devices, ``--pretrained``, ``training.log``,
``metrics.jsonl`` and the curve PNG. Everything happens inside the run directory.
"""
import contextlib
import copy
import dataclasses
import json
import logging
import os
import time

import mxnet as mx
import numpy as np
from easydict import EasyDict as edict

from iterators.formats.atomic import atomic_write_text

from recognition import checkpoints as ckpts
from recognition import distributed
from recognition import hooks as hooks_lib
from recognition.checkpoints import CheckpointPolicy, CheckpointSaver
from recognition.config import ConfigError, save_config, validate
from recognition.devices import get_contexts
from recognition.hooks import TrainingState

logger = logging.getLogger(__name__)

LOG_FILE = "training.log"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
LR_DECAY_FACTOR = 0.1  # insightface: lr *= 0.1 at every lr step
VERIFICATION_FOLDS = 10  # insightface verifies with 10 contiguous folds (LFold)
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns."""
    run_dir: str
    prefix: str
    global_step: int
    epoch: int
    stopped: str                 # "max_steps" | "end_epoch" | the reason a hook gave to request_stop
    state: TrainingState
    final_checkpoint: str        # params file of the final model ("" with ckpt=0)
    resume_state: str            # newest resume-state directory
    metrics: list                # records written to metrics.jsonl
    config: dict


# --------------------------------------------------------------------------------------------- config/run dir

def resolve_run_config(config):
    """Validate ``config`` and fill the derived keys once: ``num_classes``/``image_shape`` from ``property``
    (when the dataset has one), ``prefix`` and the run directory.

    Returns ``(cfg, run_dir)``; ``cfg`` is a new EasyDict (the input is not mutated).
    """
    cfg = validate(edict(copy.deepcopy(dict(config))))
    prop = os.path.join(cfg.dataset_path, "property")
    if os.path.isfile(prop):
        from iterators.formats.recordio import read_property
        num_classes, (height, width) = read_property(cfg.dataset_path)
        if cfg.num_classes == 0:
            cfg.num_classes = num_classes
        elif cfg.num_classes != num_classes:
            raise ConfigError(f"num_classes={cfg.num_classes} but {prop} says {num_classes}; drop --num-classes "
                              "(it is read from property) or fix the property file")
        if [height, width] != list(cfg.image_shape[:2]):
            logger.info("image_shape %s taken from %s", [height, width], prop)
            cfg.image_shape = [height, width, 3]
    elif cfg.num_classes == 0 and cfg.loss not in ("triplet", "atriplet"):
        cfg.num_classes = _num_classes_from_rec(cfg.dataset_path, prop)
    if cfg.resume:
        run_dir = cfg.resume
    elif cfg.prefix:
        run_dir = os.path.dirname(os.path.abspath(cfg.prefix))
    else:
        run_dir = os.path.join(cfg.models_root, f"{cfg.network}-{cfg.loss}-{cfg.dataset}")
    if not cfg.prefix:
        cfg.prefix = os.path.join(run_dir, "model")
    return cfg, os.fspath(run_dir)


def _num_classes_from_rec(dataset_path, prop):
    """Without ``property``, insightface's iterator needs only train.rec/.idx: count the classes from the
    header's identity records (no image is decoded)."""
    from iterators.face_iter import num_classes_from_identity_records
    from iterators.formats.recordio import FaceRecordReader
    path_imgrec = os.path.join(dataset_path, "train.rec")
    if not os.path.isfile(path_imgrec):
        raise ConfigError(f"num_classes=0 and no property file at {prop}: set --data-dir to a dataset directory "
                          "(train.rec, train.idx[, property]) or give --num-classes")
    with FaceRecordReader(path_imgrec) as reader:
        try:
            num_classes = num_classes_from_identity_records(reader)
        except ValueError as exc:
            raise ConfigError(f"num_classes=0, no property file at {prop} and {exc}; give --num-classes") from None
    logger.info("num_classes %d counted from the identity records of %s (no property file)", num_classes,
                path_imgrec)
    return num_classes


def _fused_prelu_allowed(cfg):
    """The fused PReLU operator (CPU kernels, loaded with mx.library.load) is used unless switched off, on GPUs,
    or under Horovod: with horovod.mxnet in the process, mx.library.load crashes (SIGFPE) and a library loaded
    before it corrupts the heap during training ("free(): invalid pointer"), so Horovod ranks build the
    equivalent fast_prelu graph."""
    return bool(cfg.fused_prelu) and not cfg.gpus and cfg.dist != "horovod"


@contextlib.contextmanager
def _run_log(run_dir):
    """Tee the root logger (MXNet logs through it too) into ``<run_dir>/training.log`` while training."""
    root = logging.getLogger()
    handler = logging.FileHandler(os.path.join(run_dir, LOG_FILE), encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    old_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)


# --------------------------------------------------------------------------------------------- builders

def build_lr_scheduler(cfg):
    """``MultiFactorScheduler(lr_steps, 0.1, lr)`` with optional linear warm-up; None when neither is set.

    MXNet's rule ``lr(u) = lr * 0.1 ** #{s in lr_steps : u > s}`` for update number ``u`` (1-based) equals
    upstream's "multiply by 0.1 after the callback of global batch ``s``".
    """
    if not cfg.lr_steps and not cfg.warmup_steps:
        return None
    steps = list(cfg.lr_steps) or [np.iinfo(np.int64).max]
    return mx.lr_scheduler.MultiFactorScheduler(step=steps, factor=LR_DECAY_FACTOR, base_lr=cfg.lr,
                                                warmup_steps=cfg.warmup_steps, warmup_begin_lr=0.0,
                                                warmup_mode="linear")


def build_optimizer(cfg, num_devices, begin_num_update=0):
    """insightface's ``SGD(lr, momentum, wd, rescale_grad=1/G)`` (per-device loss is already a mean)."""
    # --fp16: float32 master weights for the float16 ones (insightface train_parall --fp16-scale, multi_precision)
    return mx.optimizer.SGD(learning_rate=cfg.lr, momentum=cfg.mom, wd=cfg.wd, rescale_grad=1.0 / num_devices,
                            lr_scheduler=build_lr_scheduler(cfg), begin_num_update=begin_num_update,
                            multi_precision=bool(cfg.get("fp16")))


def _honour_param_mults(optimizer, symbol):
    """Apply ``__lr_mult__``/``__wd_mult__`` attributes and MXNet's no-wd-on-bias/beta rule after
    ``Module.init_optimizer`` filled ``optimizer.idx2name`` (what ``SGD(sym=..., param_idx2name=...)`` does)."""
    optimizer.sym_info = (symbol.attr_dict(), symbol.list_arguments())
    optimizer.set_lr_mult({})
    optimizer.set_wd_mult({})


def default_metrics(cfg):
    """``[AccMetric]`` (+ ``LossValueMetric`` when ``ce_loss``), as insightface attaches them."""
    import metrics
    out = [metrics.AccMetric()]
    if cfg.ce_loss:
        out.append(metrics.LossValueMetric())
    return out


def default_train_iter(cfg, module, contexts):
    """``FaceImageIter`` on ``<dataset_path>/train.rec`` for the global batch, seeded by ``cfg.seed``."""
    from iterators import FaceImageIter
    height, width = cfg.image_shape[:2]
    dist, shard = distributed.current(), {}
    if dist.size > 1:  # rank r reads rows [r*B, (r+1)*B) of every one-process global batch (iterators/sharded.py)
        from iterators.sharded import ShardedFaceImageIter as FaceImageIter
        shard = {"part_index": dist.rank, "num_parts": dist.size}
    return FaceImageIter(batch_size=cfg.per_batch_size * len(contexts), data_shape=(3, height, width), **shard,
                         path_imgrec=os.path.join(cfg.dataset_path, "train.rec"), shuffle=True,
                         rand_mirror=bool(cfg.data_rand_mirror), cutoff=cfg.data_cutoff,
                         color_jittering=cfg.data_color, images_filter=cfg.data_images_filter,
                         num_workers=cfg.data_workers, seed=None if cfg.seed < 0 else cfg.seed,
                         num_classes=cfg.num_classes or None)


def load_verification_sets(cfg):
    """``[(name, data_set)]`` for every ``<dataset_path>/<target>.bin`` that exists (missing: skipped, logged)."""
    sets = []
    for name in cfg.val_targets:
        path = os.path.join(cfg.dataset_path, f"{name}.bin")
        if not os.path.isfile(path):
            logger.info("verification pack %s not found, skipped", path)
            continue
        from eval.verification import check_folds, load_bin
        logger.info("ver %s", name)
        data_set = load_bin(path, tuple(cfg.image_shape[:2]))
        check_folds(len(data_set[1]), VERIFICATION_FOLDS, path)  # fail at start-up, not at the first verification
        sets.append((name, data_set))
    return sets


def plot_curves(records, path):
    """PNG of loss/accuracy, lr and verification accuracy against the global step (Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    ax_train, ax_lr, ax_ver = fig.subplots(1, 3)
    speed_recs = [r for r in records if "speed" in r]
    for key in sorted({k for r in speed_recs for k in r} - {"step", "epoch", "lr", "speed"}):
        pts = [(r["step"], r[key]) for r in speed_recs if key in r]
        ax_train.plot(*zip(*pts), label=key)
    ax_train.set_title("training metrics")
    ax_train.set_xlabel("global step")
    if speed_recs:
        ax_train.legend()
        ax_lr.plot([r["step"] for r in speed_recs], [r["lr"] for r in speed_recs])
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("global step")
    ver_recs = [r for r in records if "verification" in r]
    for name in sorted({n for r in ver_recs for n in r["verification"]}):
        pts = [(r["step"], r["verification"][name]["acc"]) for r in ver_recs if name in r["verification"]]
        ax_ver.plot(*zip(*pts), marker="o", label=name)
    if ver_recs:
        ax_ver.legend()
    ax_ver.set_title("verification accuracy (flip)")
    ax_ver.set_xlabel("global step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def _read_records(path):
    """Records of ``metrics.jsonl``; a line cut by a kill is skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _truncate_records(path, global_step):
    """On resume, drop records a killed run wrote after the state it resumes from (atomically)."""
    records = [r for r in _read_records(path) if r.get("step", 0) <= global_step]
    if os.path.isfile(path):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))




def _fast_forward(train_iter, epochs, nbatch):
    """Replay the data order up to (epoch, batch): the fallback for iterators without ``state_dict``.

    Costs one pass over the skipped batches (decoding included); exact for seeded iterators whose random
    decisions are drawn in the calling thread.
    """
    for _ in range(epochs):
        for _ in train_iter:
            pass
        train_iter.reset()
    for i in range(nbatch):
        try:
            train_iter.next()
        except StopIteration:
            raise RuntimeError(f"resume: the training data has fewer than {nbatch} batches per epoch "
                               f"(ended at {i}); it changed since the run was saved") from None


def restore_data_position(train_iter, iterator_state, epochs, nbatch):
    """Put a freshly built ``train_iter`` where the resume state left it (``epochs`` epochs + ``nbatch``).

    With a saved ``iterator_state`` and ``train_iter.load_state_dict``: O(1), nothing decoded or re-mined.
    Otherwise (custom iterators without ``state_dict``) the data order is replayed (logged).
    Returns "state" or "replay".
    """
    if iterator_state is not None and hasattr(train_iter, "load_state_dict"):
        train_iter.load_state_dict(iterator_state)
        logger.info("resume: iterator state restored at epoch %d, batch %d (no data replayed)", epochs, nbatch)
        return "state"
    if epochs or nbatch:
        why = ("the resume state has no iterator state (the iterator had no state_dict())"
               if iterator_state is None else f"{type(train_iter).__name__} has no load_state_dict()")
        logger.warning("resume: %s; replaying the data order (%d epoch(s) + %d batch(es))", why, epochs, nbatch)
    _fast_forward(train_iter, epochs, nbatch)
    return "replay"


# --------------------------------------------------------------------------------------------- trainer

class Trainer:
    """The training loop and what hooks see (see :mod:`recognition.hooks` for the events and their order).

    Attributes
    ----------
    config : EasyDict, the resolved run config
    run_dir : str
    module : mx.mod.Module, bound for training on ``contexts`` with the global ``batch_size``
    symbol : the training symbol (outputs[0] is the embedding)
    train_iter : mx.io.DataIter
    metric : mx.metric.CompositeEvalMetric
    optimizer : mx.optimizer.SGD
    state : :class:`recognition.hooks.TrainingState` (``global_step``, ``epoch``, ``nbatch``, ``lr``)
    metrics_log : :class:`recognition.hooks.MetricsLog` (``write(record)`` appends to ``metrics.jsonl``)
    hooks : list of :class:`recognition.hooks.Hook`, in call order
    stop_reason : None until a hook calls :meth:`request_stop`
    """

    def __init__(self, config, run_dir, module, symbol, train_iter, metric, optimizer, hooks, metrics_log=None,
                 state=None, contexts=None, batch_size=None, dist=None):
        self.config, self.run_dir = config, run_dir
        self.dist = dist if dist is not None else distributed.current()  # recognition.distributed backend
        self.module, self.symbol, self.train_iter = module, symbol, train_iter
        self.metric, self.optimizer, self.metrics_log = metric, optimizer, metrics_log
        self.state = state if state is not None else TrainingState()
        self.contexts, self.batch_size = contexts, batch_size
        self.hooks = list(hooks)
        self.stop_reason = None
        self.loss_scaler = None  # --fp16: recognition.mixed_precision.DynamicLossScaler (skips overflowed updates)
        self._hook_names = []
        for hook in self.hooks:
            name, n = hook.name, 1
            while name in self._hook_names:
                n += 1
                name = f"{hook.name}#{n}"
            self._hook_names.append(name)

    def request_stop(self, reason, message=None):
        """End training after the current step has reached every hook; ``fit`` returns ``stopped=reason``."""
        if self.stop_reason is None:
            self.stop_reason = reason
            logger.info("training finished: %s", message or reason)

    def publish_verification(self, results):
        """Call ``after_verification(trainer, results)`` on every hook, in order."""
        for hook in self.hooks:
            hook.after_verification(self, results)

    def hook_states(self):
        """``{hook name: state_dict()}`` of the hooks that have state."""
        states = {}
        for name, hook in zip(self._hook_names, self.hooks):
            state = hook.state_dict()
            if state is not None:
                states[name] = state
        return states

    def load_hook_states(self, states):
        """Give every hook its saved state (hooks missing from ``states`` keep their initial state)."""
        for name, hook in zip(self._hook_names, self.hooks):
            if name in states:
                hook.load_state_dict(states[name])

    def metric_state(self):
        """Running sums of every leaf metric (local and global), saved in the resume state."""
        return [{"name": leaf.name, "sum_metric": float(leaf.sum_metric), "num_inst": int(leaf.num_inst),
                 "global_sum_metric": float(leaf.global_sum_metric), "global_num_inst": int(leaf.global_num_inst)}
                for leaf in hooks_lib.leaf_metrics(self.metric)]

    def load_metric_state(self, states):
        """Restore :meth:`metric_state` (so a run resumed mid-epoch logs the values a straight run logs)."""
        leaves = hooks_lib.leaf_metrics(self.metric)
        if [s["name"] for s in states] != [leaf.name for leaf in leaves]:
            logger.info("resume: metrics %s differ from the saved %s; they restart from zero",
                        [leaf.name for leaf in leaves], [s["name"] for s in states])
            return
        for leaf, saved in zip(leaves, states):
            leaf.sum_metric, leaf.num_inst = saved["sum_metric"], saved["num_inst"]
            leaf.global_sum_metric, leaf.global_num_inst = saved["global_sum_metric"], saved["global_num_inst"]

    def _call(self, event):
        for hook in self.hooks:
            getattr(hook, event)(self)

    def train(self):
        """``before_train``, the epochs (stopping early on :meth:`request_stop`), ``after_train``; returns the
        stop reason ("end_epoch" when the epochs ran out)."""
        self._call("before_train")
        if self.stop_reason is None:
            self._run_epochs()
        if self.stop_reason is None:
            self.stop_reason = "end_epoch"
        self._call("after_train")
        return self.stop_reason

    def _run_epochs(self):
        """insightface ``Module.fit``: per batch forward_backward, update, metric update; the Module's
        ``Epoch[%d] Train-...`` / ``Time cost`` lines and ``train_iter.reset()`` at the end of each epoch."""
        state, module, metric = self.state, self.module, self.metric
        first_epoch = state.epoch
        for epoch in range(first_epoch, self.config.end_epoch):
            state.epoch = epoch
            tic = time.time()
            if epoch != first_epoch or state.nbatch == 0:
                metric.reset()
            for batch in self.train_iter:
                self.dist.step_started()
                module.forward_backward(batch)
                if self.loss_scaler is None or self.loss_scaler.step(module, self.optimizer):
                    module.update()
                before = distributed.metric_sums(metric) if self.dist.size > 1 else None
                module.update_metric(metric, batch.label)
                if before is not None:  # every rank holds the global batch's metric sums
                    self.dist.sync_metric(metric, before)
                state.global_step += 1
                state.nbatch += 1
                state.lr = self.optimizer.learning_rate
                self._call("after_step")
                if self.stop_reason is not None:
                    return
            if state.nbatch == 0:  # an empty epoch would repeat end_epoch times, training nothing
                source = getattr(self.train_iter, "path_imgrec", type(self.train_iter).__name__)
                raise RuntimeError(f"epoch {epoch} yielded no training batch ({source})")
            for name, value in metric.get_global_name_value():
                logger.info("Epoch[%d] Train-%s=%f", epoch, name, value)
            logger.info("Epoch[%d] Time cost=%.3f", epoch, time.time() - tic)
            self._call("after_epoch")
            self.train_iter.reset()
            state.nbatch = 0
            state.epoch = epoch + 1


# --------------------------------------------------------------------------------------------- fit

def default_hooks(cfg, batch_size, ver_sets, verification_test, last_good=None):
    """The built-in hooks in call order (the :class:`CheckpointSaver` is added after the user's hooks)."""
    return [
        hooks_lib.NonFiniteGuard(last_good=last_good),
        hooks_lib.Speedometer(batch_size, cfg.frequent),
        hooks_lib.LrLogger(),
        hooks_lib.PeriodicVerification(ver_sets, batch_size, cfg.verbose, verification_test,
                                       nfolds=VERIFICATION_FOLDS),
        hooks_lib.MaxSteps(cfg.max_steps),
    ]


def fit(config, make_train_iter=None, metrics=None, symbol=None, hooks=None):
    """Train as insightface's ``train_net`` (``recognition/arcface_mxnet/train.py``) and return a
    :class:`FitResult`.

    ``hooks``: :class:`recognition.hooks.Hook` instances called after the default hooks (and before the
    checkpoint saver) on every event. Raises :class:`recognition.hooks.NonFiniteError` when the
    loss/metric/embedding becomes NaN/inf (the message names the step and the last good checkpoint, which is
    left intact).
    """
    cfg, run_dir = resolve_run_config(config)
    if _fused_prelu_allowed(cfg):
        from symbols import ops
        ops.load()  # before anything else registers MXNet operators
    dist = distributed.setup(cfg)
    os.makedirs(run_dir, exist_ok=True)
    # one training per run directory (its lock also clears what killed writers left there)
    with ckpts.RunDirLock(run_dir) if dist.is_root else contextlib.nullcontext():
        with _run_log(run_dir) if dist.is_root else distributed.quiet_logging():
            with distributed.failure_report(dist):
                return _fit(cfg, run_dir, make_train_iter, metrics, symbol, list(hooks or []))


def _fit(cfg, run_dir, make_train_iter, metrics, symbol, user_hooks):
    logger.info("Called with config: %s", json.dumps(dict(cfg), sort_keys=True, default=str))
    dist = distributed.current()
    if dist.is_root:
        save_config(cfg, run_dir)
    contexts = dist.contexts(cfg.gpus, cfg.ctx)
    num_devices = len(contexts)
    batch_size = cfg.per_batch_size * num_devices
    if dist.size > 1:  # lr is not scaled with the rank count (as insightface)
        logger.info("global batch %d = per_batch_size %d x %d device(s) x %d rank(s) (%s)", batch_size * dist.size,
                    cfg.per_batch_size, num_devices, dist.size, dist.describe())
    height, width = cfg.image_shape[:2]
    logger.info("image_size %s", [height, width])
    logger.info("num_classes %d", cfg.num_classes)
    logger.info("lr_steps %s", list(cfg.lr_steps))
    if cfg.seed >= 0:
        mx.random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    if symbol is None:
        import symbols
        from symbols import ops
        # the fused PReLU has CPU kernels only; on GPUs (or when switched off) the same graph is built without it
        previous = ops.set_enabled(_fused_prelu_allowed(cfg) and all(c.device_type == "cpu" for c in contexts))
        try:
            symbol = symbols.get_symbol(cfg)
        finally:
            ops.set_enabled(previous)
    if cfg.get("fp16"):
        from recognition import mixed_precision
        symbol = mixed_precision.convert_for_config(symbol, cfg, contexts)
    saver = CheckpointSaver.from_config(cfg, run_dir)
    resume = None
    if cfg.resume:
        resume = saver.load_latest(symbol)
        logger.info("resuming %s from global step %d (%s)", run_dir, resume.state["global_step"], resume.path)
        if dist.is_root:
            _truncate_records(os.path.join(run_dir, METRICS_FILE), resume.state["global_step"])
    if cfg.model_parallel or cfg.sample_rate < 1.0:  # fc7 split by class over the contexts (+ Partial FC)
        from recognition.model_parallel import ModelParallelModule
        module = ModelParallelModule(symbol, contexts, cfg)
    else:
        module = mx.mod.Module(symbol=symbol, context=contexts, data_names=("data",), label_names=("softmax_label",),
                               fixed_param_names=["loss_scale"] if cfg.get("fp16") else None)
    module.bind(data_shapes=[("data", (batch_size, 3, height, width))],
                label_shapes=[("softmax_label", (batch_size,))], for_training=True)
    initializer = _initializer(cfg)
    if resume:
        module.init_params(initializer=None, arg_params=resume.arg_params, aux_params=resume.aux_params,
                           allow_missing=False, allow_extra=False)
    elif cfg.pretrained:
        arg_params, aux_params = ckpts.load_pretrained(cfg.pretrained, cfg.pretrained_epoch)
        ckpts.check_pretrained(cfg.pretrained, symbol, arg_params, aux_params,
                               {"data": (batch_size, 3, height, width), "softmax_label": (batch_size,)})
        module.init_params(initializer=initializer, arg_params=arg_params, aux_params=aux_params,
                           allow_missing=True, allow_extra=True)
    else:
        module.init_params(initializer=initializer)

    state = TrainingState()
    if resume:
        for key in dataclasses.asdict(state):
            if key in resume.state:
                setattr(state, key, resume.state[key])
        if cfg.seed >= 0:
            # MXNet's generator state (Dropout masks) is not saved: reseed deterministically per resume point.
            # Weights after a resume equal a straight run exactly only for nets without random ops.
            mx.random.seed(cfg.seed + state.global_step)
    train_iter = (make_train_iter or default_train_iter)(cfg, module, contexts)
    try:
        return _train(cfg, run_dir, module, symbol, train_iter, metrics, state, resume, saver, user_hooks,
                      contexts)
    finally:
        close = getattr(train_iter, "close", None)
        if callable(close):
            close()


def _train(cfg, run_dir, module, symbol, train_iter, metrics, state, resume, saver, user_hooks, contexts):
    num_devices = len(contexts)
    batch_size = cfg.per_batch_size * num_devices
    height, width = cfg.image_shape[:2]
    expected = (batch_size, 3, height, width)
    got = tuple(train_iter.provide_data[0].shape)
    if got != expected:
        raise ValueError(f"training iterator yields data of shape {got}, the module is bound for {expected} "
                         f"(per_batch_size {cfg.per_batch_size} x {num_devices} device(s))")

    dist = distributed.current()
    optimizer = build_optimizer(cfg, num_devices * dist.size, begin_num_update=state.global_step)
    module.init_optimizer(kvstore=dist.kvstore(cfg.kvstore, num_devices), optimizer=dist.wrap_optimizer(optimizer))
    if module._optimizer is not optimizer:  # wrapped (Horovod): Module filled the wrapper's idx2name
        optimizer.idx2name = dict(module._optimizer.idx2name)
    if cfg.honour_param_mults:
        _honour_param_mults(optimizer, symbol)
    if resume:
        ckpts.load_optimizer_states(module, resume.optimizer_path)
    dist.broadcast_params(module)  # every rank starts from rank 0's weights (init, --pretrained or resume)
    state.lr = optimizer.learning_rate

    metric = mx.metric.CompositeEvalMetric()
    for m in (metrics if metrics is not None else default_metrics(cfg)):
        metric.add(m)

    metrics_path = os.path.join(run_dir, METRICS_FILE)
    ver_sets = load_verification_sets(cfg)
    verification_test = None
    if ver_sets:
        from eval.verification import test as verification_test
    hooks = default_hooks(cfg, batch_size, ver_sets, verification_test, last_good=saver.last_good)
    if dist.size > 1:  # rank 0 alone verifies, logs metrics and saves; every rank averages BatchNorm statistics
        hooks = distributed.rank_hooks(dist, hooks, cfg.verbose, batch_size * dist.size)
    trainer = Trainer(cfg, run_dir, module, symbol, train_iter, metric, optimizer,
                      hooks + user_hooks + ([saver] if dist.is_root else []),
                      metrics_log=hooks_lib.MetricsLog(metrics_path) if dist.is_root else None, state=state,
                      contexts=contexts, batch_size=batch_size, dist=dist)
    if cfg.get("fp16"):
        from recognition import mixed_precision
        trainer.loss_scaler = mixed_precision.DynamicLossScaler(num_devices=num_devices * dist.size)
    if resume:
        trainer.load_hook_states(resume.hook_states)
        if state.nbatch:
            trainer.load_metric_state(resume.state.get("metric", []))
        restore_data_position(train_iter, resume.iterator_state(), state.epoch, state.nbatch)
    try:
        stopped = trainer.train()
    except hooks_lib.NonFiniteError as err:
        logger.error("%s", err)
        if dist.is_root:
            _finish_plot(metrics_path, run_dir)
        raise
    if dist.is_root:
        _finish_plot(metrics_path, run_dir)
    return FitResult(run_dir=run_dir, prefix=cfg.prefix, global_step=state.global_step, epoch=state.epoch,
                     stopped=stopped, state=state,
                     final_checkpoint=saver.last_model if saver.policy != CheckpointPolicy.NONE else "",
                     resume_state=saver.last_resume_state, metrics=_read_records(metrics_path), config=dict(cfg))


def _initializer(cfg):
    import symbols
    return symbols.get_initializer(cfg.network)


def _finish_plot(metrics_path, run_dir):
    records = _read_records(metrics_path)
    if records:
        path = plot_curves(records, os.path.join(run_dir, CURVES_FILE))
        logger.info("training curves: %s", path)
