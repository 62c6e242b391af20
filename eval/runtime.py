"""Thread set-up for MXNet on CPU: use every usable core by default, never override the user.

Why this exists. MXNet 1.9.1 (``src/engine/openmp.cc``) sizes its OpenMP pool, when ``OMP_NUM_THREADS`` is
not set, as ``omp_get_num_procs() / 2`` on x86 builds (it assumes hyper-threading), so a 2-core machine
trains on ONE core (measured: r18 5.4 img/s; 10 img/s with ``OMP_NUM_THREADS=2``). What MXNet honours,
measured on the pip wheel (per-thread CPU ticks of a conv/relu/dot workload, benchmarks/bench_threads.py):

* ``OMP_NUM_THREADS=N`` or ``MXNET_OMP_MAX_THREADS=N`` in the environment *before* ``import mxnet``: yes.
* the same variables set in ``os.environ`` *after* ``import mxnet``: no (read once when libmxnet loads).
* the C API ``MXSetNumOMPThreads(N)`` after import: no (it sets the calling thread's OpenMP ICV only; the
  engine's worker threads take ``OpenMP::thread_max`` = 1 when they start).
* ``MXNET_CPU_WORKER_NTHREADS=N``: more engine workers, each running one operator at a time with its own
  OpenMP team -- parallel across independent operators only.
* ``MXNET_USE_NUM_CORES_OPERATOR_TUNING``: no effect on the thread count.

So :func:`configure_threads` applies the choice in one of two ways, and reads it back from an engine worker:

* ``mxnet`` not imported yet: sets ``OMP_NUM_THREADS`` (MXNet, OpenBLAS and child processes follow it);
* ``mxnet`` already imported (``python -m eval.verification`` imports it at module import): raises MXNet's
  ``OpenMP::thread_max`` through the library's exported ``mxnet::engine::OpenMP::Get()`` (the object's
  layout is checked against the exported ``GetRecommendedOMPThreadCount`` before and after the write) and
  calls ``MXSetNumOMPThreads`` for the calling thread. Engine worker threads read ``thread_max`` when they
  start, i.e. at the first operation on a device: call it before the first NDArray operation. A CPU worker
  that already runs is corrected by pushing ``omp_set_num_threads`` into it (``MXEnginePushSync``).

Usable cores = ``len(os.sched_getaffinity(0))``, capped by the cgroup CPU quota (v2 ``cpu.max``, v1
``cpu.cfs_quota_us / cpu.cfs_period_us``), shared by the processes of a Horovod/MPI job on this node and by
the engine workers. A thread variable the user set (``OMP_NUM_THREADS``, ``MXNET_OMP_MAX_THREADS``) is left
alone; ``MXNET_CPU_WORKER_NTHREADS`` divides the cores among the workers; ``MKL_NUM_THREADS`` /
``OPENBLAS_NUM_THREADS`` are never touched.

Shared machines: cores are counted, not load. When other processes already keep the cores busy (load above
the core count), an OpenMP team waits at every barrier for its descheduled threads: measured here at load ~8
on 2 cores, r18 x0.25 trained at 19-21 samples/s with 1 thread and 7-11 with 2 (``OMP_WAIT_POLICY=PASSIVE``
did not help). Set ``OMP_NUM_THREADS=1`` (respected) when sharing a machine that way.

This module imports no project package and imports ``mxnet`` only when needed, so it can run before it.
"""
import ctypes
import logging
import math
import os
import sys
import threading
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

#: Variables whose explicit value the user chose; reported, never overwritten.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MKL_NUM_THREADS",
                   "OPENBLAS_NUM_THREADS", "MXNET_ENGINE_TYPE")
#: Per-node process counts set by launchers (Horovod, Open MPI, MPICH/Intel MPI, torchrun-style).
LOCAL_SIZE_ENV_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE",
                       "LOCAL_WORLD_SIZE")

# mxnet::engine::OpenMP (include/mxnet/../src/engine/openmp.h, 1.9.1): bool enabled_; int omp_thread_max_;
# int reserve_cores_; const bool omp_num_threads_set_in_environment_ -- offsets 0, 4, 8, 12 (checked against
# the disassembly of GetRecommendedOMPThreadCount, and at run time by calling it).
_OPENMP_GET = "_ZN5mxnet6engine6OpenMP3GetEv"
_OPENMP_RECOMMENDED = "_ZNK5mxnet6engine6OpenMP28GetRecommendedOMPThreadCountEb"
_OFF_ENABLED, _OFF_THREAD_MAX, _OFF_RESERVE, _OFF_ENV_SET = 0, 4, 8, 12

# Values this module wrote into os.environ (so a second call does not mistake them for the user's).
_WRITTEN = {}
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------- cores
def _read(path):
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _levels(mount, rel):
    """Directories from ``mount/rel`` up to ``mount`` (those that exist)."""
    rel = rel.strip("/")
    parts = rel.split("/") if rel else []
    out = []
    for i in range(len(parts), -1, -1):
        path = os.path.join(mount, *parts[:i])
        if os.path.isdir(path):
            out.append(path)
    return out


def _v2_quota(directory):
    text = _read(os.path.join(directory, "cpu.max"))
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory):
    quota, period = _read(os.path.join(directory, "cpu.cfs_quota_us")), _read(os.path.join(directory, "cpu.cfs_period_us"))
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(proc_cgroup="/proc/self/cgroup", cgroup_root="/sys/fs/cgroup"):
    """CPU limit of this process's cgroup in cores (e.g. 1.5), or None when unlimited or unknown.

    Reads the process's cgroup paths from ``proc_cgroup`` and, for cgroup v2 (``0::/path``), ``cpu.max`` under
    ``cgroup_root`` (or its hybrid ``unified/`` mount); for v1 (``N:cpu,cpuacct:/path``), ``cpu.cfs_quota_us``
    and ``cpu.cfs_period_us`` under ``cgroup_root/cpu`` (or ``cpu,cpuacct``). Every level from the process's
    cgroup up to the mount root counts (a parent's limit binds its children); the smallest wins. Inside a
    container the path in ``proc_cgroup`` may be the host's: levels that do not exist are skipped.
    """
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            for mount in (cgroup_root, os.path.join(cgroup_root, "unified")):
                limits += [_v2_quota(d) for d in _levels(mount, rel)]
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                mount = os.path.join(cgroup_root, name)
                if os.path.isdir(mount):
                    limits += [_v1_quota(d) for d in _levels(mount, rel)]
                    break
    limits = [q for q in limits if q]
    return min(limits) if limits else None


def affinity_cpus():
    """Number of CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cpus(affinity=None, quota=None):
    """``min(affinity, floor(quota))``, at least 1. ``affinity``: count (default :func:`affinity_cpus`);
    ``quota``: cores from :func:`cgroup_cpu_quota` or None (unlimited)."""
    affinity = affinity_cpus() if affinity is None else int(affinity)
    cpus = max(1, affinity)
    if quota:
        cpus = min(cpus, max(1, int(math.floor(quota + 1e-9))))
    return cpus


# -------------------------------------------------------------------------------------------- decision
def _positive_int(text):
    """First integer of an OpenMP-style value ("4", "4,2"), or None when not a positive integer."""
    try:
        value = int(str(text).split(",")[0].strip())
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def local_processes(environ):
    """Processes of this job on this node, from the launcher's environment (1 when not launched)."""
    for name in LOCAL_SIZE_ENV_VARS:
        value = _positive_int(environ.get(name))
        if value:
            return value
    return 1


@dataclass
class ThreadChoice:
    """What :func:`choose_threads` decided: ``omp_threads`` per engine worker, where it came from, and whether
    this module has to apply it (False when the user's own variable already sets it)."""
    omp_threads: int
    source: str
    apply: bool
    reason: str


def choose_threads(cpus, environ, requested=None, processes=1, workers=None):
    """Pure decision: OpenMP threads per MXNet engine worker.

    Parameters
    ----------
    cpus : int, usable CPUs of this process (:func:`usable_cpus`)
    environ : mapping; a user-set ``OMP_NUM_THREADS`` or ``MXNET_OMP_MAX_THREADS`` wins, unchanged
    requested : int or None, the caller's explicit thread count (e.g. a CLI flag)
    processes : int, processes sharing this node's CPUs (Horovod/MPI local size)
    workers : int or None, engine workers running operators at once (CPU contexts of the process); default
        ``MXNET_CPU_WORKER_NTHREADS`` or 1
    """
    for name in ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS"):
        if name in environ and _WRITTEN.get(name) != environ[name]:
            value = _positive_int(environ[name])
            if value:
                return ThreadChoice(value, f"env {name}", False, f"{name}={environ[name]} set by the user")
    if requested:
        return ThreadChoice(int(requested), "argument", True, f"requested {requested}")
    if workers is None:
        workers = _positive_int(environ.get("MXNET_CPU_WORKER_NTHREADS")) or 1
    processes, workers = max(1, int(processes)), max(1, int(workers))
    threads = max(1, cpus // (processes * workers))
    parts = [f"{cpus} usable cpu{'s' if cpus != 1 else ''}"]
    if processes > 1:
        parts.append(f"/ {processes} processes on this node")
    if workers > 1:
        parts.append(f"/ {workers} engine workers")
    return ThreadChoice(threads, "auto", True, " ".join(parts))


# ------------------------------------------------------------------------------------ MXNet internals
def _lib():
    import mxnet as mx
    return mx.base._LIB


def _openmp_ptr(lib):
    get = getattr(lib, _OPENMP_GET)
    get.restype = ctypes.c_void_p
    get.argtypes = []
    return get()


def _recommended(lib, ptr, exclude_reserved=True):
    fn = getattr(lib, _OPENMP_RECOMMENDED)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    return fn(ptr, exclude_reserved)


def _omp_fn(lib, name, restype=ctypes.c_int, argtypes=()):
    fn = getattr(lib, name)  # dlsym through libmxnet's handle finds the libgomp it links
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


class _Ctx(ctypes.Structure):  # mxnet::Context
    _fields_ = [("dev_type", ctypes.c_int), ("dev_id", ctypes.c_int)]


_SYNC_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


def run_in_engine_worker(fn, device_id=0):
    """Run ``fn()`` inside an MXNet engine worker thread of ``cpu(device_id)`` and return its result.

    Uses the C API ``MXEnginePushSync`` (the operator path every NDArray op takes), then ``waitall``. With the
    default ``ThreadedEnginePerDevice`` the CPU device has one normal worker, so this reaches it.
    """
    import mxnet as mx
    lib = mx.base._LIB
    result = {}

    def callback(_run_ctx, _param):
        try:
            result["value"] = fn()
        except Exception as exc:  # noqa: BLE001 -- reported to the caller, never raised in a C thread
            result["error"] = exc
    c_callback = _SYNC_FN(callback)
    ctx = _Ctx(1, int(device_id))  # kCPU = 1
    mx.base.check_call(lib.MXEnginePushSync(c_callback, None, None, ctypes.byref(ctx), None, 0, None, 0, None, 0,
                                            b"eval.runtime.probe"))
    mx.nd.waitall()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def engine_omp_threads(device_id=0):
    """``omp_get_max_threads()`` as seen by the engine worker of ``cpu(device_id)``: the OpenMP team size
    MXNet's CPU operators (and MKLDNN) run with there."""
    fn = _omp_fn(_lib(), "omp_get_max_threads")
    return run_in_engine_worker(fn, device_id)


def mxnet_openmp_state():
    """MXNet's OpenMP bookkeeping, read from the loaded library (dict; empty values when unreadable)."""
    state = {"thread_max": None, "reserve_cores": None, "omp_num_threads_in_env_at_import": None,
             "recommended_main_thread": None, "omp_get_max_threads_main_thread": None}
    try:
        lib = _lib()
        ptr = _openmp_ptr(lib)
        state.update(thread_max=ctypes.c_int.from_address(ptr + _OFF_THREAD_MAX).value,
                     reserve_cores=ctypes.c_int.from_address(ptr + _OFF_RESERVE).value,
                     omp_num_threads_in_env_at_import=bool(ctypes.c_uint8.from_address(ptr + _OFF_ENV_SET).value),
                     recommended_main_thread=_recommended(lib, ptr),
                     omp_get_max_threads_main_thread=_omp_fn(lib, "omp_get_max_threads")())
    except (ImportError, AttributeError, OSError, ValueError) as exc:
        state["error"] = f"{type(exc).__name__}: {exc}"
    return state


class RuntimeApplyError(RuntimeError):
    """MXNet's OpenMP state could not be changed at run time (unexpected library layout)."""


def _apply_runtime(threads, device_id=0):
    """Raise MXNet's OpenMP thread count in a process that already imported mxnet; return the worker readback."""
    lib = _lib()
    ptr = _openmp_ptr(lib)
    enabled = ctypes.c_uint8.from_address(ptr + _OFF_ENABLED).value
    env_set = ctypes.c_uint8.from_address(ptr + _OFF_ENV_SET).value
    thread_max = ctypes.c_int.from_address(ptr + _OFF_THREAD_MAX)
    reserve = ctypes.c_int.from_address(ptr + _OFF_RESERVE).value
    if enabled not in (0, 1) or env_set not in (0, 1) or not 0 <= thread_max.value <= 1 << 16 or not 0 <= reserve <= 1 << 16:
        raise RuntimeApplyError(f"unexpected mxnet::engine::OpenMP layout (enabled={enabled}, env={env_set}, "
                                f"thread_max={thread_max.value}, reserve={reserve})")
    set_threads = _omp_fn(lib, "omp_set_num_threads", None, [ctypes.c_int])
    if not env_set:  # with OMP_NUM_THREADS at import MXNet follows the OpenMP ICV alone
        old = thread_max.value
        thread_max.value = threads
        lib.MXSetNumOMPThreads(ctypes.c_int(threads))  # the calling thread (NaiveEngine runs ops here)
        if _recommended(lib, ptr, False) != threads:
            thread_max.value = old
            raise RuntimeApplyError("mxnet::engine::OpenMP did not report the new thread count; layout differs")
    else:
        set_threads(threads)
    get_threads = _omp_fn(lib, "omp_get_max_threads")
    seen = run_in_engine_worker(get_threads, device_id)
    if seen != threads:  # the worker started before: it fixed its team size then; set it there
        run_in_engine_worker(lambda: set_threads(threads), device_id)
        seen = run_in_engine_worker(get_threads, device_id)
    return seen


# ------------------------------------------------------------------------------------------ public API
@dataclass
class ThreadSetting:
    """Result of :func:`configure_threads`.

    ``omp_threads``: OpenMP threads per engine worker; ``source``: ``auto``, ``argument`` or ``env <VAR>``;
    ``method``: how it was applied (``env OMP_NUM_THREADS (before import mxnet)``, ``runtime``, ``none``);
    ``engine_worker_threads``: read back from an engine worker (None when not checked); ``cpus`` and the
    inputs of the decision; ``user_env``: thread variables found in the environment.
    """
    omp_threads: int
    source: str
    method: str
    cpus: int
    affinity: int
    cgroup_quota: float = None
    processes: int = 1
    workers: int = 1
    engine_worker_threads: int = None
    reason: str = ""
    user_env: dict = field(default_factory=dict)
    warning: str = ""

    def line(self):
        quota = "none" if not self.cgroup_quota else f"{self.cgroup_quota:g}"
        seen = "not checked" if self.engine_worker_threads is None else str(self.engine_worker_threads)
        env = " ".join(f"{k}={v}" for k, v in self.user_env.items()) or "none"
        text = (f"threads: {self.omp_threads} OpenMP thread{'s' if self.omp_threads != 1 else ''} per MXNet engine "
                f"worker ({self.source}: {self.reason}; affinity {self.affinity}, cgroup quota {quota}; "
                f"applied: {self.method}; engine worker sees {seen}; thread env: {env})")
        return text + (f" WARNING: {self.warning}" if self.warning else "")

    def as_dict(self):
        return asdict(self)


def cpu_workers(ctx):
    """Engine workers computing at once for a context spec: ``"cpu:N"`` -> N, a list of ``mx.Context`` -> its
    CPU contexts (each CPU context has its own engine worker); anything else (GPU, "", None) -> 1."""
    if ctx is None or ctx == "":
        return 1
    if isinstance(ctx, str):
        kind, _, count = ctx.strip().partition(":")
        return max(1, _positive_int(count) or 1) if kind == "cpu" else 1
    try:
        return max(1, sum(1 for c in ctx if getattr(c, "device_type", "") == "cpu"))
    except TypeError:
        return 1


def configure_threads(num_threads=None, workers=None, processes=None, environ=None, verify=True, log=True,
                      affinity=None, quota="detect", ctx=None):
    """Make MXNet use the usable CPU cores; return a :class:`ThreadSetting` and log it in one line.

    Call at the start of an entry point's ``main()``, before the first NDArray operation (``import mxnet``
    before it is fine). Idempotent. Never overrides ``OMP_NUM_THREADS`` / ``MXNET_OMP_MAX_THREADS`` set by the
    user; with ``MXNET_ENGINE_TYPE`` or ``MXNET_CPU_WORKER_NTHREADS`` set, the cores are shared among workers.

    Parameters
    ----------
    num_threads : int, optional. An explicit thread count (e.g. a ``--threads`` flag) instead of the cores.
    workers : int, optional. Engine workers computing at once; default from ``ctx``, else
        ``MXNET_CPU_WORKER_NTHREADS`` or 1.
    ctx : str or list of mx.Context, optional. The training contexts (``config.ctx``: ``"cpu:N"`` trains N
        CPU contexts, each with its own engine worker, so each gets ``cores / N`` threads).
    processes : int, optional. Processes of the job on this node; default from Horovod/MPI variables.
    environ : mapping, default ``os.environ`` (written when the choice is applied before ``import mxnet``).
    verify : bool. Read the thread count back from an engine worker (imports mxnet).
    affinity, quota : injection points for tests (CPU count; cores or None); default: detected.
    """
    environ = os.environ if environ is None else environ
    if workers is None and cpu_workers(ctx) > 1:
        workers = cpu_workers(ctx)
    with _LOCK:
        affinity = affinity_cpus() if affinity is None else int(affinity)
        quota = cgroup_cpu_quota() if quota == "detect" else quota
        cpus = usable_cpus(affinity, quota)
        processes = local_processes(environ) if processes is None else int(processes)
        choice = choose_threads(cpus, environ, requested=num_threads, processes=processes, workers=workers)
        user_env = {k: environ[k] for k in THREAD_ENV_VARS if k in environ and _WRITTEN.get(k) != environ[k]}
        setting = ThreadSetting(omp_threads=choice.omp_threads, source=choice.source, method="none", cpus=cpus,
                                affinity=affinity, cgroup_quota=quota, processes=processes,
                                workers=workers or _positive_int(environ.get("MXNET_CPU_WORKER_NTHREADS")) or 1,
                                reason=choice.reason, user_env=user_env)
        if choice.apply:
            if "mxnet" not in sys.modules:
                environ["OMP_NUM_THREADS"] = str(choice.omp_threads)
                _WRITTEN["OMP_NUM_THREADS"] = environ["OMP_NUM_THREADS"]
                setting.method = "env OMP_NUM_THREADS (before import mxnet)"
            else:
                try:
                    setting.engine_worker_threads = _apply_runtime(choice.omp_threads)
                    setting.method = "runtime (mxnet already imported)"
                except (RuntimeApplyError, AttributeError, OSError) as exc:
                    setting.warning = (f"could not set MXNet's thread count at run time ({exc}); "
                                       f"export OMP_NUM_THREADS={choice.omp_threads} before starting Python")
                if environ is os.environ and "OMP_NUM_THREADS" not in environ:
                    environ["OMP_NUM_THREADS"] = str(choice.omp_threads)  # child processes start the same
                    _WRITTEN["OMP_NUM_THREADS"] = environ["OMP_NUM_THREADS"]
        if verify and setting.engine_worker_threads is None:
            try:
                setting.engine_worker_threads = engine_omp_threads()
            except (ImportError, AttributeError, OSError) as exc:
                setting.warning = setting.warning or f"engine readback failed: {exc}"
        if (setting.engine_worker_threads is not None and setting.engine_worker_threads != setting.omp_threads
                and not setting.warning):
            setting.warning = ("an engine worker runs with a different thread count: call configure_threads() "
                               "before the first MXNet operation")
    if log:
        (logger.warning if setting.warning else logger.info)("%s", setting.line())
    return setting
