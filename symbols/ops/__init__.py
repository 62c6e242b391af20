"""Custom C++ operators for the backbones: a fused per-channel PReLU (``fused_prelu``).

insightface's activation (symbol/fresnet.py and symbol/fmobilefacenet.py ``Act``) is
``mx.sym.LeakyReLU(act_type='prelu')``; :func:`symbols.common.fast_prelu` rebuilds it from relu and depthwise
1x1 deconvolutions (1.5x-4.6x faster). ``fused_prelu`` does forward and backward (dx and the true dgamma) in one
OpenMP pass each and runs at ReLU speed on NCHW tensors; inside a network, though, MXNet 1.9 hands a library
operator NCHW copies of MKLDNN-layout tensors (and converts its outputs back), which costs most of what the
fusion saves: whole networks train at about the graph's speed (y1 +11%, r18 -6%;
benchmarks/bench_fused_prelu.py), hence opt-in. It is compiled from ``fused_prelu.cc`` on first use (see
:mod:`symbols.ops.build`) and loaded with ``mx.library.load``; without a compiler, or when the build or the load
fails, or when disabled, :func:`prelu` builds the ``fast_prelu`` graph instead (same parameter, same numbers).

Public API
----------
- :func:`load` () -> bool: build (cached) and load the library once per process; logs once which PReLU is used
  and why. ``INSIGHTFACE_MX_FUSED_PRELU=0`` disables it (checked at every call).
- :func:`available` () -> bool: ``load()``, not disabled and allowed by :func:`set_enabled` (off by default;
  the engine allows it for CPU training with ``fused_prelu = True``).
- :func:`status` () -> dict: ``used``, ``reason``, ``path``.
- :func:`prelu` (data, name, num_channels, ndim=4, gamma=None) -> Symbol: the fused op when available, else
  ``fast_prelu``; the slope parameter is always ``<name>_gamma`` (C,), init Constant(0.25), so checkpoints
  are interchangeable between the two and with insightface's LeakyReLU(prelu).
- :func:`prelu_op` (data, gamma, name, num_channels=None, ndim=None) -> Symbol: the op node itself (needs ``load()``).
- :func:`call_counts` () -> {'forward': n, 'backward': n} / :func:`reset_call_counts`: how often the C++
  kernels ran (proves the op is really in a bound graph).
- Portability (:mod:`symbols.ops.portable`): :func:`portable_symbol` / :func:`portable_json` rewrite op nodes
  into the standard ``fast_prelu`` (default) or ``LeakyReLU(prelu)`` graph so a saved ``-symbol.json`` never
  needs the library; :func:`fuse_symbol` does the reverse for a loaded checkpoint symbol;
  :func:`uses_fused_op`; :func:`save_checkpoint` (``mx.model.save_checkpoint`` with a portable symbol).

Limits: float32, CPU only (no GPU kernel: on a GPU context use the graph). The library API does not pass
``grad_req``: ``'add'`` is NOT honoured (the gradient is overwritten; ``'null'`` is respected), so code that
accumulates gradients over several backward passes must build the ``fast_prelu`` graph (``INSIGHTFACE_MX_FUSED_PRELU=0``
or ``symbols.common.fast_prelu``).
"""
import ctypes
import logging
import os
import sys
import threading

import mxnet as mx

from . import build
from .portable import (OP_NAME, fuse_symbol, portable_json, portable_symbol, save_checkpoint,
                       uses_fused_op)

logger = logging.getLogger(__name__)

__all__ = ["OP_NAME", "ENV_SWITCH", "load", "available", "status", "prelu", "prelu_op", "call_counts",
           "reset_call_counts", "set_enabled", "portable_symbol", "portable_json", "fuse_symbol", "uses_fused_op",
           "save_checkpoint", "disabled"]

ENV_SWITCH = "INSIGHTFACE_MX_FUSED_PRELU"
_OFF_VALUES = ("0", "off", "false", "no", "disable", "disabled")

_lock = threading.Lock()
_state = {"enabled": False, "tried": False, "loaded": False, "path": None, "reason": None, "cdll": None, "logged": set()}


def disabled():
    """True when ``$INSIGHTFACE_MX_FUSED_PRELU`` is 0/off/false/no."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF_VALUES


def _log_once(key, level, msg, *args):
    if key not in _state["logged"]:
        _state["logged"].add(key)
        logger.log(level, msg, *args)


def load():
    """Build (if needed) and load the operator library once per process; True when ``fused_prelu`` is usable.

    Never raises: a missing compiler, a build error or a load error is logged (once) and gives False, and the
    callers fall back to :func:`symbols.common.fast_prelu`.
    """
    if disabled():
        _log_once("disabled", logging.INFO, "PReLU: fast_prelu graph (fused operator disabled by %s=%s)",
                  ENV_SWITCH, os.environ.get(ENV_SWITCH))
        return False
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _try_load()
        if _state["loaded"]:
            _log_once("used", logging.INFO, "PReLU: fused C++ operator %s (%s)", OP_NAME, _state["path"])
        else:
            _log_once("fallback", logging.WARNING, "PReLU: fast_prelu graph (fused operator unavailable: %s)",
                      _state["reason"])
        return _state["loaded"]


# Python modules after whose import mx.library.load kills the process with SIGFPE (horovod.mxnet registers its own
# operators through its C++ extension; reproduced with horovod 0.28.1 + mxnet 1.9.1). Loading first is safe.
_LOAD_BLOCKERS = ("horovod.mxnet",)


def _try_load():
    blockers = [name for name in _LOAD_BLOCKERS if name in sys.modules]
    if blockers and not (hasattr(mx.sym, OP_NAME) and hasattr(mx.nd, OP_NAME)):
        _state["reason"] = (f"{', '.join(blockers)} is already imported and mx.library.load would crash the process "
                            "(SIGFPE); load symbols.ops before importing it")
        return
    if hasattr(mx.sym, OP_NAME) and hasattr(mx.nd, OP_NAME):
        # registered by someone else (e.g. mx.library.load of another copy): usable, but no call counters
        _state.update(loaded=True, path=None, reason="already registered in this process")
        return
    try:
        path = build.ensure_built()
    except build.BuildError as exc:
        _state["reason"] = f"build failed: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 - any failure means fallback, never a crash
        _state["reason"] = f"build failed: {type(exc).__name__}: {exc}"
        return
    try:
        mx.library.load(path, False)
        if not hasattr(mx.sym, OP_NAME):
            raise RuntimeError(f"library loaded but mx.sym.{OP_NAME} is missing")
        cdll = ctypes.CDLL(path)  # same file -> same dlopen handle as MXNet's: shares the counters
        cdll.fused_prelu_call_count.restype = ctypes.c_longlong
        cdll.fused_prelu_call_count.argtypes = [ctypes.c_int]
        cdll.fused_prelu_last_threads.restype = ctypes.c_int
    except Exception as exc:  # noqa: BLE001
        _state["reason"] = f"load of {path} failed: {type(exc).__name__}: {exc}"
        return
    _state.update(loaded=True, path=path, reason="built and loaded", cdll=cdll)


def set_enabled(flag):
    """Allow (True) or forbid (False, the default) the fused operator in symbols built from now on in this process.

    Opt-in: the engine allows it for CPU training when the config says ``fused_prelu = True``. The operator has CPU
    kernels only, so a caller that binds symbols on a GPU must leave it off. Returns the previous setting.
    """
    previous = _state["enabled"]
    _state["enabled"] = bool(flag)
    return previous


def available():
    """True when the fused operator is allowed, loaded and not disabled (builds/loads on first call)."""
    return _state["enabled"] and load()


def status():
    """{'used': bool, 'reason': str, 'path': library path or None} after trying :func:`load`."""
    used = load()
    reason = f"disabled by {ENV_SWITCH}" if disabled() else _state["reason"]
    return {"used": used, "reason": reason, "path": _state["path"]}


def prelu_op(data, gamma, name, num_channels=None, ndim=None):
    """The ``fused_prelu`` node ``name`` on (data, gamma); RuntimeError when the library is not loaded.

    ``num_channels`` and ``ndim`` (the rank of ``data``), both optional, are stored as attributes: the first is
    checked against the data at shape inference; both are used by :func:`portable_symbol` to rebuild the
    ``fast_prelu`` graph (its fast 4-D form needs ``ndim=4``; without it the rank-agnostic form is written).
    """
    if not _state["loaded"] or not hasattr(mx.sym, OP_NAME):
        raise RuntimeError(f"{OP_NAME} is not loaded; call symbols.ops.load() first (or use symbols.ops.prelu, "
                           "which falls back to fast_prelu)")
    kwargs = {"num_channels": int(num_channels)} if num_channels is not None else {}
    if ndim is not None:
        kwargs["ndim"] = int(ndim)
    return getattr(mx.sym, OP_NAME)(data, gamma, name=name, **kwargs)


def prelu(data, name, num_channels, ndim=4, gamma=None):
    """Per-channel PReLU with slope ``<name>_gamma`` (C,), Constant(0.25): fused op if available, else fast_prelu.

    Drop-in for the ``fast=True`` branch of :func:`symbols.common.prelu` (same signature order, same parameter
    name, shape and initialiser; output named ``<name>_output`` in both implementations).
    """
    from ..common import PRELU_INIT, fast_prelu  # local: symbols.common may import this package at its top

    if gamma is None:
        gamma = mx.sym.Variable(name + "_gamma", shape=(num_channels,), init=mx.init.Constant(PRELU_INIT))
    if load():
        return prelu_op(data, gamma, name, num_channels, ndim=ndim)
    return fast_prelu(data, gamma, name, num_channels, ndim=ndim)


def call_counts():
    """{'forward': n, 'backward': n, 'last_threads': t}: C++ kernel calls since load/reset (zeros if not loaded).

    Waits for all pending MXNet work first (``mx.nd.waitall``), since operators run asynchronously.
    """
    mx.nd.waitall()
    cdll = _state["cdll"]
    if cdll is None:
        return {"forward": 0, "backward": 0, "last_threads": 0}
    return {"forward": int(cdll.fused_prelu_call_count(0)), "backward": int(cdll.fused_prelu_call_count(1)),
            "last_threads": int(cdll.fused_prelu_last_threads())}


def reset_call_counts():
    """Zero the C++ call counters (after waiting for pending MXNet work)."""
    mx.nd.waitall()
    if _state["cdll"] is not None:
        _state["cdll"].fused_prelu_reset_counts()
