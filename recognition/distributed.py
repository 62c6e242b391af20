"""Data parallel across processes and nodes: one small backend object over Horovod or MXNet's ps-lite KVStore.

``--dist none`` (default, one process), ``--dist horovod`` (``horovodrun -np N [-H hosts] python -m
recognition.train_softmax --dist horovod ...``; Gloo on CPU, NCCL on GPU) or ``--kvstore dist_sync`` /
``dist_device_sync`` (``python -m recognition.launch -n WORKERS -s SERVERS -- python -m recognition.train_softmax
--kvstore dist_sync ...``). insightface's own choices: ``recognition/partial_fc/mxnet/train_memory.py`` (Horovod:
``hvd.init``, rank/local_rank/size, one process per GPU, ``hvd.broadcast`` of the parameters from rank 0,
``MXNET_UPDATE_ON_KVSTORE=0``), ``recognition/arcface_mxnet/train.py`` (``Module.fit(kvstore=args.kvstore)`` with
``dist_sync``).

API (:func:`init` once per process, then :func:`current`; the engine, the iterators' sharding and the
model-parallel fc7 use the same object)::

    dist = recognition.distributed.init(kind)     # 'none' | 'horovod' | 'kvstore:dist_sync' (see backend_kind)
    dist.kind, dist.rank, dist.size, dist.local_rank, dist.local_size, dist.is_root
    dist.allreduce(nd, average=False, name=None) -> NDArray   # sum (or mean) over ranks, same shape
    dist.allgather(nd, name=None) -> NDArray                  # rows of every rank, rank order (uneven allowed)
    dist.broadcast(nd, root=0, name=None) -> NDArray          # root's value everywhere
    dist.barrier()
    dist.broadcast_params(module)                             # rank 0's arg+aux params into every rank's Module
    dist.average_aux(module)                                  # mean of BatchNorm statistics over ranks
    dist.sync_metric(metric, before)                          # metric sums = sums over every rank's batches

Every collective takes and returns ``mx.nd.NDArray`` (results on the input's context, the input is not
modified). ``name`` identifies a Horovod tensor (ranks must use the same names in the same order); the ps-lite
backend uses it as a key prefix. With ``size == 1`` every collective returns a copy of its input.

Gradients: Horovod's ``DistributedOptimizer`` (allreduce, sum) or the KVStore's push/pull (sum over workers)
reduce the gradients; the optimizer's ``rescale_grad`` is ``1 / (devices x ranks)``, so one update uses the mean
gradient of the global batch ``per_batch_size x devices x ranks`` -- exactly what one process with
``devices x ranks`` contexts computes. The learning rate is never scaled (as insightface; the global batch is
logged). insightface's ``dist_sync`` path set ``rescale_grad = 1/devices`` and so summed the workers' mean
gradients (an effective lr x workers); here both backends average, so a 2-rank run equals a 2-device run.

Failures: a rank that raises logs ``rank R/N failed: ...`` and exits non-zero; ``horovodrun`` and
``recognition.launch`` then stop the other ranks (named in their messages). Collectives use Horovod's timeouts
(``HOROVOD_GLOO_TIMEOUT_SECONDS`` for rendezvous/connections, a stall shutdown after ``dist_timeout`` seconds)
and, for ps-lite, a watchdog thread that ends the process (naming the rank) when a collective or a training step
waits longer than ``dist_timeout``; the launcher kills the rest.
"""
import atexit
import contextlib
import gc
import logging
import os
import sys
import threading
import time
import traceback

import mxnet as mx
import numpy as np

from recognition.hooks import Hook, leaf_metrics

logger = logging.getLogger(__name__)

BACKENDS = ("none", "horovod", "kvstore")
KVSTORE_DIST = ("dist_sync", "dist_device_sync")
DEFAULT_TIMEOUT = 1800  # seconds a collective may wait (a rank-0 verification pass included)
_CURRENT = None


class DistributedError(RuntimeError):
    """A collective failed or timed out, or the distributed set-up is wrong (the message names the rank)."""


def backend_kind(dist, kvstore):
    """``(backend, kvstore type)`` from ``--dist`` and ``--kvstore``; raises ValueError on a bad combination.

    ``--dist none`` with ``--kvstore dist_sync|dist_device_sync`` -> ps-lite (insightface's way); ``--dist
    kvstore`` needs one of those; ``--dist horovod`` needs a local kvstore (``device``/``local``).
    """
    dist = dist or "none"
    if dist not in BACKENDS:
        raise ValueError(f"dist must be one of {', '.join(BACKENDS)}, got {dist!r}")
    if kvstore == "dist_async":
        raise ValueError("kvstore dist_async is not supported (asynchronous updates break the global-batch "
                         "semantics); use dist_sync or dist_device_sync")
    if dist == "horovod":
        if kvstore in KVSTORE_DIST:
            raise ValueError(f"--dist horovod reduces gradients with Horovod; --kvstore {kvstore} would reduce them "
                             "again through ps-lite: use --kvstore device (or local) with --dist horovod")
        return "horovod", kvstore
    if dist == "kvstore" and kvstore not in KVSTORE_DIST:
        raise ValueError(f"--dist kvstore needs --kvstore {' or '.join(KVSTORE_DIST)} (got {kvstore!r})")
    if kvstore in KVSTORE_DIST:
        return "kvstore", kvstore
    return "none", kvstore


def current():
    """The backend of this process (a single-process one when :func:`init` was not called)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = NoneBackend()
    return _CURRENT


def init(kind="none", kvstore="device", timeout=DEFAULT_TIMEOUT):
    """Start the backend once per process (later calls with the same kind return it) and return it."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT.kind == kind and not isinstance(_CURRENT, NoneBackend):
        return _CURRENT
    if kind == "none":
        _CURRENT = NoneBackend()
    elif kind == "horovod":
        _CURRENT = HorovodBackend(timeout=timeout)
    elif kind == "kvstore":
        _CURRENT = KVStoreBackend(kvstore, timeout=timeout)
    else:
        raise ValueError(f"unknown distributed backend {kind!r} (one of {', '.join(BACKENDS)})")
    if _CURRENT.size > 1 or kind != "none":
        logger.info("distributed: %s rank %d/%d (local rank %d/%d)", _CURRENT.describe(), _CURRENT.rank,
                    _CURRENT.size, _CURRENT.local_rank, _CURRENT.local_size)
    return _CURRENT


def setup(cfg):
    """:func:`init` from a run config (``dist``, ``kvstore``, ``dist_timeout``); returns the backend."""
    kind, kvstore = backend_kind(cfg.dist, cfg.kvstore)
    if kind == "none" and (_CURRENT is None or isinstance(_CURRENT, NoneBackend)):
        return current()
    return init(kind, kvstore, timeout=cfg.dist_timeout)


@contextlib.contextmanager
def quiet_logging():
    """Ranks other than 0 log warnings and errors only (rank 0 logs what one process logs)."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(logging.WARNING, root.level))
    try:
        yield
    finally:
        root.setLevel(old)


@contextlib.contextmanager
def failure_report(dist):
    """With several ranks: an exception is logged as ``rank R/N failed: ...`` (traceback included) and the process
    ends at once with status 1, so ``horovodrun`` / ``recognition.launch`` stop the other ranks; a normal interpreter
    exit could block in Horovod's or ps-lite's shutdown waiting for peers that wait for this rank."""
    try:
        yield
    except BaseException as exc:  # noqa: B902 - every failure must end the rank
        if dist.size <= 1:
            raise
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        msg = f"{dist.where()} failed: {type(exc).__name__}: {exc}"
        logger.error("%s\n%s", msg, text)
        print(f"error: {msg}", file=sys.stderr, flush=True)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1 if not isinstance(exc, KeyboardInterrupt) else 130)
    finally:
        dist.training_done()


class AverageAuxStates(Hook):
    """Hook (every rank, before verification and checkpointing): :meth:`Backend.average_aux` every ``period`` steps
    and when training ends, so rank 0 verifies and saves the BatchNorm statistics of all devices of all ranks."""

    def __init__(self, dist, period):
        self.dist, self.period = dist, int(period)

    def after_step(self, trainer):
        if trainer.state.global_step % self.period == 0:
            self.dist.average_aux(trainer.module)

    def after_train(self, trainer):
        self.dist.average_aux(trainer.module)


def rank_hooks(dist, hooks, period, global_batch):
    """The engine's default hooks for a multi-rank run: the Speedometer counts the global batch; verification
    (``PeriodicVerification``) runs on rank 0 only; :class:`AverageAuxStates` runs on every rank before it."""
    from recognition import hooks as hooks_lib
    out = []
    for hook in hooks:
        if isinstance(hook, hooks_lib.Speedometer):
            hook.batch_size = global_batch
        if isinstance(hook, hooks_lib.PeriodicVerification):
            out.append(AverageAuxStates(dist, period))
            if not dist.is_root:
                continue
        out.append(hook)
    return out


def _reset_for_tests():
    global _CURRENT
    _CURRENT = None


class Backend:
    """Common behaviour; subclasses implement ``_allreduce_sum``, ``_broadcast`` and ``barrier``."""
    kind = "none"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        self.timeout = float(timeout)
        self._counter = 0

    @property
    def is_root(self):
        return self.rank == 0

    def describe(self):
        return self.kind

    def where(self):
        """``rank R/N`` for messages."""
        return f"rank {self.rank}/{self.size}"

    def _name(self, name, what):
        if name is None:
            self._counter += 1
            name = f"{what}.{self._counter}"
        return name

    # ---------------------------------------------------------------- collectives (NDArray in, NDArray out)
    def allreduce(self, arr, average=False, name=None):
        """Sum (``average``: mean) of ``arr`` over the ranks; a new NDArray on ``arr``'s context."""
        if self.size == 1:
            return arr.copy()
        out = self._allreduce_sum(arr, self._name(name, "allreduce"))
        return out / self.size if average else out

    def allgather(self, arr, name=None):
        """Concatenation along axis 0 of every rank's ``arr`` in rank order (row counts may differ)."""
        if self.size == 1:
            return arr.copy()
        name = self._name(name, "allgather")
        rows = self._allreduce_sum(self._onehot(arr.shape[0], arr.context), name + ".rows").asnumpy()
        rows = [int(round(r)) for r in rows]
        total = sum(rows)
        start = sum(rows[:self.rank])
        buf = mx.nd.zeros((total,) + arr.shape[1:], ctx=arr.context, dtype=arr.dtype)
        buf[start:start + arr.shape[0]] = arr
        return self._allreduce_sum(buf, name)

    def broadcast(self, arr, root=0, name=None):
        """``root``'s ``arr`` on every rank (a new NDArray)."""
        if self.size == 1:
            return arr.copy()
        return self._broadcast(arr, root, self._name(name, "broadcast"))

    def barrier(self):
        pass

    def _onehot(self, value, ctx):
        v = mx.nd.zeros((self.size,), ctx=ctx, dtype="float64")
        v[self.rank] = value
        return v

    def _allreduce_sum(self, arr, name):
        raise NotImplementedError

    def _broadcast(self, arr, root, name):
        mask = arr if self.rank == root else mx.nd.zeros_like(arr)
        return self._allreduce_sum(mask, name)

    # ---------------------------------------------------------------- training helpers
    def contexts(self, gpus="", ctx=""):
        """This rank's devices: ``--gpus``/``--ctx`` when given; else, under a launcher, GPU ``local_rank``
        when MXNet sees GPUs (one process per GPU, as insightface's partial_fc), else one CPU context."""
        from recognition.devices import get_contexts
        if gpus or ctx or self.size == 1:
            return get_contexts(gpus, ctx)
        if mx.context.num_gpus() > 0:
            return [mx.gpu(self.local_rank % mx.context.num_gpus())]
        return [mx.cpu()]

    def kvstore(self, kvstore, num_devices):
        """What ``Module.init_optimizer(kvstore=...)`` gets on this backend."""
        return kvstore

    def wrap_optimizer(self, optimizer):
        """The optimizer ``Module`` drives (Horovod: ``hvd.DistributedOptimizer``); ``optimizer`` keeps working as
        the engine's handle (learning rate, ``num_update``)."""
        return optimizer

    def broadcast_params(self, module):
        """Give every rank rank 0's parameters (arg and aux) -- at start, after ``--pretrained`` and after resume."""
        if self.size == 1:
            return
        mx.nd.waitall()
        arg_params, aux_params = module.get_params()
        new_arg = {k: self.broadcast(v, 0, name=f"param.{k}") for k, v in sorted(arg_params.items())}
        new_aux = {k: self.broadcast(v, 0, name=f"param.{k}") for k, v in sorted(aux_params.items())}
        module.set_params(new_arg, new_aux, allow_missing=False, force_init=True, allow_extra=False)
        mx.nd.waitall()

    def average_aux(self, module):
        """Replace every device's auxiliary states (BatchNorm moving mean/var) by their mean over the ranks.

        ``Module.get_params`` of one process averages the devices' statistics; this makes rank 0's saved and
        verified statistics that same mean over every device of every rank (moving averages are linear, so
        writing the mean back changes nothing a one-process run would not average anyway).
        """
        if self.size == 1:
            return
        group = module._exec_group
        mx.nd.waitall()
        for name, arrays in zip(module._aux_names, group.aux_arrays):
            local = sum(a.copyto(mx.cpu()) for a in arrays) / len(arrays)
            mean = self.allreduce(local, average=True, name=f"aux.{name}")
            for a in arrays:
                mean.copyto(a)
        mx.nd.waitall()

    def sync_metric(self, metric, before):
        """After ``update_metric`` on this rank's batch: add the other ranks' increments, so every rank holds the
        sums over the global batch (what one process's metric holds). ``before``: :func:`metric_sums` taken
        before the update."""
        if self.size == 1:
            return
        leaves = leaf_metrics(metric)
        after = metric_sums(metric)
        delta = mx.nd.array(np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64),
                            dtype="float64")
        total = self.allreduce(delta, name="metric").asnumpy()
        for i, leaf in enumerate(leaves):
            s, n, gs, gn = before[i * 4:i * 4 + 4]
            ds, dn, dgs, dgn = total[i * 4:i * 4 + 4]
            leaf.sum_metric, leaf.num_inst = s + float(ds), int(round(n + dn))
            leaf.global_sum_metric, leaf.global_num_inst = gs + float(dgs), int(round(gn + dgn))

    def step_started(self):
        """Called before every training step (the ps-lite watchdog's heartbeat)."""

    def training_done(self):
        """Training ended (normally or not): stop watching steps."""

    def shutdown(self):
        pass


def metric_sums(metric):
    """Flat list ``[sum, num, global_sum, global_num] * leaves`` of a (composite) metric."""
    out = []
    for leaf in leaf_metrics(metric):
        out += [float(leaf.sum_metric), float(leaf.num_inst), float(leaf.global_sum_metric),
                float(leaf.global_num_inst)]
    return out


class NoneBackend(Backend):
    """One process (devices inside it are MXNet's business: ``kvstore=device|local``)."""
    kind = "none"

    def _allreduce_sum(self, arr, name):
        return arr.copy()


# ---------------------------------------------------------------------------------------------------- Horovod

class HorovodBackend(Backend):
    """Horovod (``horovod.mxnet``): rank/size from ``hvd``, gradients through ``hvd.DistributedOptimizer``."""
    kind = "horovod"

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        super().__init__(timeout)
        # Must be set before hvd.init(): Gloo's connect/rendezvous timeout, and a stalled collective (a rank that
        # stopped submitting without dying) ends the job instead of hanging. Users' own values win.
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(min(self.timeout, 600))))
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", "60")
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(self.timeout)))
        # insightface partial_fc/mxnet/train_memory.py: optimizer on the worker, never on a kvstore.
        os.environ["MXNET_UPDATE_ON_KVSTORE"] = "0"
        try:
            import horovod.mxnet as hvd
        except ImportError as exc:
            raise DistributedError(
                f"--dist horovod: Horovod is not installed ({exc}); run `make install-dist` (builds horovod==0.28.1 "
                "with MXNet and Gloo) and start training with horovodrun") from None
        self.hvd = hvd
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self._errors = self._error_types()

    def _error_types(self):
        try:
            from horovod.common.exceptions import HorovodInternalError
            return (HorovodInternalError, mx.base.MXNetError)
        except ImportError:
            return (mx.base.MXNetError,)

    def describe(self):
        gloo = self.hvd.gloo_enabled() if hasattr(self.hvd, "gloo_enabled") else None
        return f"horovod ({'gloo' if gloo else 'mpi'})"

    def _guard(self, fn, what):
        try:
            out = fn()
            out.wait_to_read()
            return out
        except self._errors as exc:
            raise DistributedError(f"{self.where()}: horovod {what} failed (another rank stopped or the network "
                                   f"failed): {exc}") from exc

    def _allreduce_sum(self, arr, name):
        return self._guard(lambda: self.hvd.allreduce(arr, average=False, name=name), f"allreduce {name}")

    def allgather(self, arr, name=None):
        if self.size == 1:
            return arr.copy()
        name = self._name(name, "allgather")
        return self._guard(lambda: self.hvd.allgather(arr, name=name), f"allgather {name}")

    def _broadcast(self, arr, root, name):
        return self._guard(lambda: self.hvd.broadcast(arr, root_rank=root, name=name), f"broadcast {name}")

    def barrier(self):
        if self.size > 1:
            self._allreduce_sum(mx.nd.zeros((1,)), self._name(None, "barrier"))

    def wrap_optimizer(self, optimizer):
        if self.size == 1:
            return optimizer
        rescale = optimizer.rescale_grad
        wrapped = self.hvd.DistributedOptimizer(optimizer)
        # DistributedOptimizer divides rescale_grad by size (its "average"); ours already is 1/(devices x ranks).
        optimizer.rescale_grad = rescale
        return wrapped


# ---------------------------------------------------------------------------------------------------- ps-lite

class KVStoreBackend(Backend):
    """MXNet's ps-lite KVStore (``dist_sync`` / ``dist_device_sync``) started by :mod:`recognition.launch`.

    rank = ``kv.rank``, size = ``kv.num_workers``; local rank from the launcher's ``LOCAL_RANK`` (else 0).
    Collectives: allreduce = ``push`` + ``pull`` on a key the servers sum (no optimizer runs on the servers:
    ``MXNET_UPDATE_ON_KVSTORE=0``, so the optimizer states stay on the workers and are saved by rank 0);
    broadcast = ``init`` (the servers keep worker 0's value) + ``pull``.
    """
    kind = "kvstore"

    def __init__(self, kvstore_type, timeout=DEFAULT_TIMEOUT):
        super().__init__(timeout)
        if kvstore_type not in KVSTORE_DIST:
            raise DistributedError(f"kvstore backend needs one of {KVSTORE_DIST}, got {kvstore_type!r}")
        missing = [v for v in ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER",
                               "DMLC_NUM_WORKER") if not os.environ.get(v)]
        if missing:
            raise DistributedError(f"--kvstore {kvstore_type} needs the ps-lite environment ({', '.join(missing)} "
                                   "unset): start training with `python -m recognition.launch -n WORKERS -s SERVERS "
                                   "-- <training command>`")
        os.environ["MXNET_UPDATE_ON_KVSTORE"] = "0"
        self.type = kvstore_type
        self.kv = mx.kv.create(kvstore_type)
        self.rank, self.size = self.kv.rank, self.kv.num_workers
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_size = int(os.environ.get("LOCAL_SIZE", "1"))
        self._inited = set()
        self._watchdog = _Watchdog(self.timeout, self.where)
        # Free the KVStore (its destructor runs ps-lite's final barrier) before MXNet's own atexit shutdown of
        # its engine; freed later, during interpreter teardown, the process aborts ("terminate called ...").
        atexit.register(self.close)

    def close(self):
        """Wait for pending work and release the KVStore (ps-lite finalises with the other nodes)."""
        if getattr(self, "kv", None) is None:
            return
        mx.nd.waitall()
        self.kv = None
        gc.collect()

    def describe(self):
        return f"ps-lite {self.type}"

    def kvstore(self, kvstore, num_devices):
        return self.kv

    def _allreduce_sum(self, arr, name):
        key = f"__dist__.{name}"
        buf = arr.astype("float32", copy=True) if arr.dtype != np.float32 else arr.copy()
        with self._watchdog.watch(f"allreduce {name}"):
            if key not in self._inited:
                self.kv.init(key, mx.nd.zeros(buf.shape, ctx=buf.context))
                self._inited.add(key)
            self.kv.push(key, buf)
            out = mx.nd.zeros(buf.shape, ctx=buf.context)
            self.kv.pull(key, out=out)
            out.wait_to_read()
        return out.astype(arr.dtype) if arr.dtype != np.float32 else out

    def _broadcast(self, arr, root, name):
        if root != 0:
            return super()._broadcast(arr, root, name)
        self._counter += 1
        key = f"__bcast__.{name}.{self._counter}"
        buf = arr.astype("float32", copy=True) if arr.dtype != np.float32 else arr.copy()
        with self._watchdog.watch(f"broadcast {name}"):
            self.kv.init(key, buf)  # the servers keep worker 0's value
            out = mx.nd.zeros(buf.shape, ctx=buf.context)
            self.kv.pull(key, out=out)
            out.wait_to_read()
        return out.astype(arr.dtype) if arr.dtype != np.float32 else out

    def barrier(self):
        with self._watchdog.watch("barrier"):
            self.kv._barrier()

    def step_started(self):
        self._watchdog.beat()

    def training_done(self):
        self._watchdog.idle()


class _Watchdog:
    """Ends the process (exit 3, naming the rank) when a collective or a step waits longer than ``timeout``.

    ps-lite waits forever for a dead peer; the launcher notices the exit and stops every other process.
    Steps are watched between two :meth:`beat` calls (a rank-0 verification pass must fit in ``timeout``).
    """

    def __init__(self, timeout, where):
        self.timeout, self.where = timeout, where
        self._what, self._since = None, None
        self._lock = threading.Lock()
        if timeout > 0:
            threading.Thread(target=self._run, name="dist-watchdog", daemon=True).start()

    def watch(self, what):
        watchdog = self

        class _Ctx:
            def __enter__(self):
                with watchdog._lock:
                    watchdog._prev = (watchdog._what, watchdog._since)
                    watchdog._what, watchdog._since = what, time.monotonic()

            def __exit__(self, *exc):
                with watchdog._lock:
                    watchdog._what, watchdog._since = watchdog._prev
        return _Ctx()

    def idle(self):
        with self._lock:
            self._what, self._since = None, None

    def beat(self):
        with self._lock:
            self._what, self._since = "training step", time.monotonic()

    def _run(self):
        while True:
            time.sleep(min(5.0, max(self.timeout / 10, 0.2)))
            with self._lock:
                what, since = self._what, self._since
            if since is not None and time.monotonic() - since > self.timeout:
                msg = (f"{self.where()}: {what} waited more than {self.timeout:.0f} s (dist_timeout); another "
                       "worker or server is gone or stuck. Stopping this worker.")
                logger.error("%s", msg)
                print(f"error: {msg}", file=sys.stderr, flush=True)
                os._exit(3)


__all__ = ["BACKENDS", "KVSTORE_DIST", "DistributedError", "backend_kind", "init", "setup", "current", "metric_sums",
           "quiet_logging", "failure_report", "rank_hooks", "AverageAuxStates",
           "Backend", "NoneBackend", "HorovodBackend", "KVStoreBackend"]
