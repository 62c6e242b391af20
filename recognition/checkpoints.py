"""Checkpoints: insightface's files, the resume state, and :class:`CheckpointSaver`, the one writer of both.

Files in a run directory (prefix ``<run_dir>/model`` by default)
-----------------------------------------------------------------
``model-symbol.json`` / ``model-%04d.params``
    Exactly what ``mx.model.save_checkpoint`` writes (``arg:<name>`` / ``aux:<name>`` keys, CPU arrays) and
    ``mx.model.load_checkpoint`` reads. With ``ckpt_embedding`` the symbol is cut at ``fc1_output`` and every
    ``fc7*`` argument is dropped (HEAD's deployable format, ``recognition/arcface_mxnet/train.py``).
``resume/step-%010d/``
    Everything needed to continue: ``state.json`` (global step, epoch, batch within the epoch, lr, config, the
    running metric sums and the hooks' states, the saver's best accuracies and save counter among them),
    ``full.params`` (all args incl. ``fc7`` + aux), ``optimizer.states`` (momentum buffers), ``symbol.json`` (the training symbol, compared on
    resume) and ``iterator.json`` (``train_iter.state_dict()``, when the iterator has one). The directory is
    assembled under a temporary name and renamed into place, so it is either complete or absent; the two newest
    are kept.

Every file goes through :mod:`iterators.formats.atomic` (temporary file, fsync, ``os.replace``), so a
``kill -9`` at any moment leaves the previous version loadable. During training only
:class:`CheckpointSaver` calls the writers below.
"""
import enum
import errno
import fcntl
import io
import json
import logging
import math
import os
import pickle
import shutil
import time
import typing

import mxnet as mx
import numpy as np

from iterators.formats.atomic import (PRIVATE_FILE, TMP_PREFIX, atomic_write, atomic_write_text,
                                      clean_stale_temporaries, file_mode, fsync_dir, temp_dir)
from iterators.formats.params import read_params
from recognition.hooks import Hook, NonFiniteError
from symbols.ops import portable_json

logger = logging.getLogger(__name__)

RESUME_DIR = "resume"
STATE_FILE = "state.json"
PARAMS_FILE = "full.params"
OPTIMIZER_FILE = "optimizer.states"
SYMBOL_FILE = "symbol.json"  # training symbol of the run, compared on resume
ITERATOR_FILE = "iterator.json"  # train_iter.state_dict(), restored instead of replaying the data
KEEP_RESUME_STATES = 2  # newest complete resume states kept (older ones are deleted after a new one lands)
LOCK_FILE = ".lock"  # fcntl.flock'd by the training process that owns the run directory
OPTIMIZER_FORMAT = "insightface-mx optimizer states v1"  # NDArray file + JSON structure, no pickle
_STRUCTURE_KEY = "__structure__"


class RunLockedError(RuntimeError):
    """Another training process holds the run directory."""


def _nd_verifier(payload):
    """A ``verify`` for :func:`atomic_write`: the file re-loads with MXNet and has every key with its shape."""
    expected = {k: tuple(v.shape) for k, v in payload.items()}

    def verify(tmp):
        loaded = mx.nd.load(tmp)
        got = {k: tuple(v.shape) for k, v in loaded.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got))
            raise ValueError(f"read back {len(got)} of {len(expected)} arrays (first missing or different: "
                             f"{(missing or [k for k in expected if got.get(k) != expected[k]])[0]})")
    return verify


def save_nd(path, payload):
    """``mx.nd.save(path, payload)`` atomically, 0600, re-loaded before it replaces ``path``."""
    return atomic_write(path, lambda tmp: mx.nd.save(tmp, payload), mode=PRIVATE_FILE,
                        verify=_nd_verifier(payload))


def save_params(path, arg_params, aux_params):
    """``nd.save`` the ``arg:``/``aux:`` dict of ``mx.model.save_checkpoint`` to ``path`` atomically."""
    payload = {f"arg:{k}": v.as_in_context(mx.cpu()) for k, v in arg_params.items()}
    payload.update({f"aux:{k}": v.as_in_context(mx.cpu()) for k, v in aux_params.items()})
    return save_nd(path, payload)


def first_non_finite(arg_params, aux_params):
    """Name of the first parameter holding NaN/inf (``arg:``/``aux:`` prefixed), or None."""
    for kind, params in (("arg", arg_params), ("aux", aux_params)):
        for name, value in params.items():
            if not np.isfinite(value.asnumpy()).all():
                return f"{kind}:{name}"
    return None


def load_params(path):
    """Read an ``arg:``/``aux:`` params file -> ``(arg_params, aux_params)`` with a clear error."""
    return read_params(path)


def embedding_checkpoint(symbol, arg_params, aux_params):
    """Cut the training symbol at ``fc1_output`` and drop ``fc7*`` arguments (HEAD ``ckpt_embedding``)."""
    internals = symbol.get_internals()
    if "fc1_output" not in internals.list_outputs():
        raise ValueError("ckpt_embedding needs an 'fc1_output' node in the training symbol; set ckpt_embedding=0")
    emb = internals["fc1_output"]
    return emb, {k: v for k, v in arg_params.items() if not k.startswith("fc7")}, dict(aux_params)


def save_checkpoint(prefix, epoch, symbol, arg_params, aux_params):
    """``mx.model.save_checkpoint`` semantics (``prefix-symbol.json``, ``prefix-%04d.params``), atomically.

    Returns the params path.
    """
    if hasattr(symbol, "_remove_amp_cast"):  # as mx.model.save_checkpoint(remove_amp_cast=True)
        symbol = symbol._remove_amp_cast()
    # A graph trained with the fused C++ PReLU is saved as the equivalent standard graph: the checkpoint then
    # loads anywhere (insightface's tools, GPUs, machines without the library), with the same parameters.
    atomic_write_text(f"{prefix}-symbol.json", portable_json(symbol), mode=PRIVATE_FILE)
    params_path = "%s-%04d.params" % (prefix, epoch)
    save_params(params_path, arg_params, aux_params)
    return params_path


def load_checkpoint(prefix, epoch):
    """``mx.model.load_checkpoint`` with a clear error naming the missing file."""
    for path in (f"{prefix}-symbol.json", "%s-%04d.params" % (prefix, epoch)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path} (expected prefix,epoch = {prefix},{epoch})")
    return mx.model.load_checkpoint(prefix, epoch)


def parse_pretrained(text, default_epoch=1):
    """``"prefix,epoch"`` or ``"prefix"`` -> ``(prefix, epoch)``."""
    prefix, _, epoch = text.partition(",")
    if not epoch:
        return prefix, int(default_epoch)
    try:
        return prefix, int(epoch)
    except ValueError:
        raise ValueError(f"--pretrained {text!r}: epoch {epoch!r} is not an integer (use prefix,epoch)") from None


def load_pretrained(text, default_epoch=1):
    """Load weights only for ``--pretrained prefix,epoch`` -> ``(arg_params, aux_params)``."""
    prefix, epoch = parse_pretrained(text, default_epoch)
    params_path = "%s-%04d.params" % (prefix, epoch)
    logger.info("loading %s %d", prefix, epoch)
    return load_params(params_path)


def check_pretrained(text, symbol, arg_params, aux_params, input_shapes):
    """Compare ``--pretrained`` weights with the network before ``init_params`` (MXNet fails deep inside, or
    silently re-initialises, otherwise).

    A parameter whose shape differs raises ValueError naming the first one and both shapes (another width or
    embedding size). Parameters the checkpoint lacks are initialised: ``fc7*`` alone (fine-tuning from an
    embedding checkpoint) is logged; anything else (e.g. r18 -> r34) is a WARNING naming the count.
    ``input_shapes``: ``{"data": shape, "softmax_label": shape}`` the Module is bound with.
    Returns the sorted list of missing parameter names.
    """
    arg_shapes, _, aux_shapes = symbol.infer_shape(**{k: v for k, v in input_shapes.items()
                                                      if k in symbol.list_arguments()})
    wanted = dict(zip(symbol.list_arguments(), arg_shapes))
    wanted_aux = dict(zip(symbol.list_auxiliary_states(), aux_shapes))
    for kind, have, want in (("argument", arg_params, wanted), ("auxiliary state", aux_params, wanted_aux)):
        for name, shape in want.items():
            if name in have and tuple(have[name].shape) != tuple(shape):
                raise ValueError(f"--pretrained {text}: {kind} {name} has shape {tuple(have[name].shape)} in the "
                                 f"checkpoint but {tuple(shape)} in this network; the checkpoint was trained with "
                                 "another network, width (--version-multiplier) or --emb-size")
    missing = sorted(n for n in wanted if n not in input_shapes and n not in arg_params)
    missing += sorted(n for n in wanted_aux if n not in aux_params)
    backbone = [n for n in missing if not n.startswith("fc7")]
    if backbone:
        logger.warning("--pretrained %s: %d of %d network parameter(s) are not in the checkpoint and are "
                       "initialised from scratch (first: %s); is it the same network?", text, len(backbone),
                       len(wanted) + len(wanted_aux) - len(input_shapes), ", ".join(backbone[:5]))
    elif missing:
        logger.info("pretrained: %d parameter(s) not in the checkpoint, initialised: %s", len(missing),
                    ", ".join(missing))
    return missing


# --------------------------------------------------------------------------------------------- optimizer states

def _encode_tree(obj, arrays):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, mx.nd.NDArray):
        key = "s%d" % len(arrays)
        arrays[key] = obj.as_in_context(mx.cpu())
        return {"nd": key}
    if isinstance(obj, np.ndarray):
        key = "s%d" % len(arrays)
        arrays[key] = mx.nd.array(obj, dtype=obj.dtype)
        return {"np": key}
    if isinstance(obj, (np.integer, np.floating)):
        return {"value": obj.item()}
    if isinstance(obj, (tuple, list)):
        return {type(obj).__name__: [_encode_tree(v, arrays) for v in obj]}
    if isinstance(obj, dict):
        return {"dict": [[_encode_tree(k, arrays), _encode_tree(v, arrays)] for k, v in obj.items()]}
    raise TypeError(f"optimizer state of type {type(obj).__name__} cannot be saved (NDArrays, numbers, strings, "
                    "tuples, lists and dicts only)")


def _decode_tree(node, arrays, path):
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"{path}: malformed optimizer state structure")
    (kind, value), = node.items()
    if kind == "value":
        return value
    if kind in ("nd", "np"):
        if value not in arrays:
            raise ValueError(f"{path}: optimizer state array {value!r} is missing (damaged file)")
        return arrays[value] if kind == "nd" else arrays[value].asnumpy()
    if kind in ("tuple", "list"):
        items = [_decode_tree(v, arrays, path) for v in value]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {_decode_tree(k, arrays, path): _decode_tree(v, arrays, path) for k, v in value}
    raise ValueError(f"{path}: unknown optimizer state node {kind!r}")


def write_state_tree(path, tree):
    """Save a tree of NDArrays/numpy arrays/numbers/strings (tuples, lists, dicts) without pickle: one NDArray
    file (``mx.nd.save``) whose ``__structure__`` entry holds the JSON layout. Atomic, 0600, verified."""
    arrays = {}
    structure = {"format": OPTIMIZER_FORMAT, "tree": _encode_tree(tree, arrays)}
    arrays[_STRUCTURE_KEY] = mx.nd.array(np.frombuffer(json.dumps(structure).encode("utf-8"), np.uint8),
                                         dtype="uint8")
    return save_nd(path, arrays)


class _LegacyStatesUnpickler(pickle.Unpickler):
    """MXNet's ``Updater.get_states()`` pickles: a dict of NDArrays (raw bytes) and None, nothing else."""
    ALLOWED = {("mxnet.ndarray.ndarray", "NDArray"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_state_tree(path):
    """Read :func:`write_state_tree`'s file, or an old pickled ``optimizer.states`` with a restricted unpickler
    (NDArrays only: a pickle that names any other class is refused, never executed). ValueError when damaged."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"optimizer states file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # pickle protocol >= 2: MXNet's Module.save_optimizer_states of older runs
        with open(path, "rb") as f:
            raw = f.read()
        try:
            tree = _LegacyStatesUnpickler(io.BytesIO(raw)).load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path}: refusing to load this pickled optimizer state ({exc}): it may execute code. "
                             "Only plain MXNet updater states are read; delete the file to resume with fresh "
                             "momentum, or resume from an earlier state") from None
        except Exception as exc:  # noqa: BLE001 - truncated or garbage
            raise ValueError(f"{path}: damaged optimizer state ({type(exc).__name__}: {exc})") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: not an MXNet updater state (a {type(tree).__name__})")
        return tree
    try:
        arrays = mx.nd.load(path)
    except mx.base.MXNetError as exc:
        raise ValueError(f"{path}: damaged optimizer state ({str(exc).strip().splitlines()[-1]})") from None
    if not isinstance(arrays, dict) or _STRUCTURE_KEY not in arrays:
        raise ValueError(f"{path}: not an optimizer state file of this toolkit (no {_STRUCTURE_KEY})")
    try:
        structure = json.loads(bytes(arrays.pop(_STRUCTURE_KEY).asnumpy().astype(np.uint8)).decode("utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: damaged optimizer state structure ({exc})") from None
    if structure.get("format") != OPTIMIZER_FORMAT:
        raise ValueError(f"{path}: optimizer state format {structure.get('format')!r}, expected {OPTIMIZER_FORMAT!r}")
    return _decode_tree(structure["tree"], arrays, path)


def _updater(module):
    """The ``mx.optimizer.Updater`` holding a Module's optimizer states in this process, or None."""
    if not isinstance(module, mx.mod.Module):
        return None
    if getattr(module, "_update_on_kvstore", False):
        return getattr(getattr(module, "_kvstore", None), "_updater", None)
    return getattr(module, "_updater", None)


def save_optimizer_states(module, path):
    """Write the Module's optimizer (updater) states to ``path`` without pickle (:func:`write_state_tree`).

    Modules keeping their states elsewhere (a distributed KVStore's servers, custom modules) fall back to their
    own ``save_optimizer_states``.
    """
    updater = _updater(module)
    if updater is None:
        return atomic_write(path, module.save_optimizer_states, mode=PRIVATE_FILE)
    return write_state_tree(path, dict(updater.states))


def load_optimizer_states(module, path):
    """Inverse of :func:`save_optimizer_states`; old pickled states are read with a restricted unpickler."""
    updater = _updater(module)
    if updater is None:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:1] == b"\x80":  # vet the pickle before a custom module unpickles it
            try:
                _PickleVetter(io.BytesIO(raw)).load()
            except pickle.UnpicklingError as exc:
                raise ValueError(f"{path}: refusing to load this pickled optimizer state ({exc}): it may "
                                 "execute code") from None
        return module.load_optimizer_states(path)
    states = read_state_tree(path)
    if not isinstance(states, dict):
        raise ValueError(f"{path}: optimizer states must be a dict of parameter index -> state")
    updater.states = states
    updater.states_synced = dict.fromkeys(states.keys(), False)
    return states


class _PickleVetter(_LegacyStatesUnpickler):
    """Numpy arrays and random states too (custom modules' optimizer payloads); still no code."""
    ALLOWED = _LegacyStatesUnpickler.ALLOWED | {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                                                 ("numpy", "dtype"), ("_codecs", "encode"),
                                                 ("numpy.core.multiarray", "scalar")}


# --------------------------------------------------------------------------------------------- resume state

def _resume_root(run_dir):
    return os.path.join(os.fspath(run_dir), RESUME_DIR)


def save_resume_state(run_dir, state, arg_params, aux_params, save_optimizer, symbol_json=None,
                      iterator_state=None, keep=KEEP_RESUME_STATES):
    """Write ``resume/step-%010d`` atomically (temp directory + rename) and keep the ``keep`` newest.

    Parameters
    ----------
    state : dict (JSON-serialisable), must contain ``global_step``
    save_optimizer : callable(path) writing the optimizer states file (``Module.save_optimizer_states``)
    symbol_json : str or None, the full training symbol (``symbol.json``), checked when resuming
    iterator_state : dict or None, ``train_iter.state_dict()`` (``iterator.json``)

    Returns
    -------
    Path of the new state directory.
    """
    root = _resume_root(run_dir)
    os.makedirs(root, mode=0o700, exist_ok=True)
    final = os.path.join(root, "step-%010d" % state["global_step"])
    tmp = temp_dir(root, "-step")
    try:
        save_params(os.path.join(tmp, PARAMS_FILE), arg_params, aux_params)
        opt_path = os.path.join(tmp, OPTIMIZER_FILE)
        save_optimizer(opt_path)
        if not os.path.isfile(opt_path):
            raise OSError(errno.EIO, f"the optimizer writer left no {opt_path}")
        if symbol_json is not None:
            atomic_write_text(os.path.join(tmp, SYMBOL_FILE), symbol_json, mode=PRIVATE_FILE)
        if iterator_state is not None:
            atomic_write_text(os.path.join(tmp, ITERATOR_FILE), json.dumps(iterator_state) + "\n", mode=PRIVATE_FILE)
        atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2, default=str) + "\n",
                          mode=PRIVATE_FILE)
        fsync_dir(tmp)
        if os.path.isdir(final):  # same step saved twice (e.g. max_steps on a verification step)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    # Prune only now that the new state is complete on disk; it is the newest, so it is never pruned.
    for old in list_resume_states(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    clean_stale_temporaries(root)  # leftovers of a killed save
    return final


def list_resume_states(run_dir):
    """Complete resume-state directories of a run, oldest first."""
    root = _resume_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and
                   os.path.isfile(os.path.join(root, n, STATE_FILE)))
    return [os.path.join(root, n) for n in names]


class ResumeState(typing.NamedTuple):
    """A loaded resume state; unpacks as ``(state, arg_params, aux_params, optimizer_path)``."""
    state: dict
    arg_params: dict
    aux_params: dict
    optimizer_path: str

    @property
    def path(self):
        """The ``resume/step-%010d`` directory."""
        return os.path.dirname(self.optimizer_path)

    @property
    def hook_states(self):
        """``{hook name: state_dict}`` saved with the state."""
        return self.state.get("hooks", {})

    def iterator_state(self):
        """``train_iter.state_dict()`` saved with the state, or None (the iterator had no ``state_dict``)."""
        path = os.path.join(self.path, ITERATOR_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def _read_resume_dir(path):
    """``(state, arg_params, aux_params)`` of one resume-state directory, every file checked (ValueError /
    OSError naming the damaged file)."""
    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{state_path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"{state_path}: no global_step")
    params_path = os.path.join(path, PARAMS_FILE)
    try:
        arg_params, aux_params = load_params(params_path)
    except mx.base.MXNetError as exc:
        raise ValueError(f"{params_path}: damaged ({str(exc).strip().splitlines()[-1]})") from None
    bad = first_non_finite(arg_params, aux_params)
    if bad:
        raise ValueError(f"{params_path}: parameter {bad} holds NaN/inf")
    read_state_tree(os.path.join(path, OPTIMIZER_FILE))
    iterator_path = os.path.join(path, ITERATOR_FILE)
    if os.path.isfile(iterator_path):
        try:
            with open(iterator_path, encoding="utf-8") as f:
                json.load(f)
        except ValueError as exc:
            raise ValueError(f"{iterator_path}: not valid JSON ({exc})") from None
    return state, arg_params, aux_params


def load_resume_state(run_dir, symbol=None):
    """Newest loadable resume state of ``run_dir`` -> :class:`ResumeState` ``(state, arg_params, aux_params,
    optimizer_path)``.

    A damaged newest state (unreadable file, NaN parameters) is named in a warning and the previous one is used.
    With ``symbol``, its arguments/aux states must equal the saved symbol's (else ValueError: network changed).
    """
    states = list_resume_states(run_dir)
    if not states:
        raise FileNotFoundError(f"--resume {run_dir}: no resume state in {_resume_root(run_dir)} (the run saved "
                                "none yet: it writes one every `verbose` batches and when it stops)")
    problems = []
    for path in reversed(states):
        try:
            state, arg_params, aux_params = _read_resume_dir(path)
            break
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            logger.warning("resume state %s is damaged and skipped: %s", path, exc)
    else:
        raise ValueError(f"--resume {run_dir}: no loadable resume state ({'; '.join(problems)})")
    if problems:
        logger.warning("resuming from the previous state %s", path)
    saved_symbol = os.path.join(path, SYMBOL_FILE)
    if symbol is not None and os.path.isfile(saved_symbol):
        # compare parameters, not JSON: auto-generated node names (blockgrad0/1...) differ between builds
        saved = mx.sym.load(saved_symbol)
        if (saved.list_arguments(), saved.list_auxiliary_states()) != (symbol.list_arguments(),
                                                                     symbol.list_auxiliary_states()):
            raise ValueError(f"--resume {run_dir}: the training symbol's parameters differ from those saved in "
                             f"{saved_symbol}; resume with the run's own network/head settings (drop the flags "
                             "that change them) or start a new run with --pretrained")
    return ResumeState(state, arg_params, aux_params, os.path.join(path, OPTIMIZER_FILE))


# --------------------------------------------------------------------------------------------- policy

class CheckpointPolicy(enum.IntEnum):
    """insightface ``--ckpt`` modes, evaluated at each verification step (``train_net._batch_callback``).

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


class HighestAccuracy:
    """insightface's best-model rule on each verification step (reproduced, including its quirks).

    With ``acc`` the accuracies in target order and ``highest_acc = [sum_at_tie, best_last]`` (both 0 at
    start): if ``acc[-1] > best_last`` -> best (``sum_at_tie`` is NOT updated); if ``acc[-1] == best_last`` and
    ``sum(acc) >= sum_at_tie`` -> best and ``sum_at_tie = sum(acc)``; then ``best_last = max``. So "best" is
    judged on the LAST target (agedb_30 by default, not lfw) and the tie-break compares with a stale sum.
    No targets: never best. (``highest_acc`` in ``train_net._batch_callback``, ``recognition/arcface_mxnet/
    train.py``.)
    """

    def __init__(self, highest_acc=None):
        self.highest_acc = list(highest_acc) if highest_acc is not None else [0.0, 0.0]

    @property
    def best(self):
        """Best accuracy of the last target so far (what ``Accuracy-Highest`` logs)."""
        return self.highest_acc[-1]

    def update(self, accs):
        """Apply one verification's accuracies (target order); returns True when it counts as highest."""
        accs = list(accs)
        if not accs:
            return False
        is_highest = False
        score = sum(accs)
        if accs[-1] >= self.highest_acc[-1]:
            if accs[-1] > self.highest_acc[-1]:
                is_highest = True
            elif score >= self.highest_acc[0]:
                is_highest = True
                self.highest_acc[0] = score
            self.highest_acc[-1] = accs[-1]
        return is_highest


# --------------------------------------------------------------------------------------------- saver

class CheckpointSaver(Hook):
    """The one writer of checkpoint files during training: ``--ckpt`` policy, best rule, resume states.

    * ``after_verification``: count the save step, apply :class:`HighestAccuracy` to the results and write
      ``prefix-%04d.params`` (+ ``prefix-symbol.json``) as :class:`CheckpointPolicy` decides (``saving %d``),
      then log ``[step]Accuracy-Highest: %1.5f`` (upstream's order).
    * ``after_step``: every ``period`` (``verbose``) global steps, a resume state (parameters incl. fc7,
      optimizer states, ``state.json`` with the position, config, metric sums and every hook's
      ``state_dict()``, the training symbol, ``train_iter.state_dict()``); the ``keep`` newest are kept.
    * ``after_train``: the final weights as ``prefix-0000.params`` (unless ``ckpt=0``; HEAD ``train_parall``
      also saves epoch 0 at ``max_steps``), so ``--ckpt 3`` keeps the best model in slot 1 and the last one in
      slot 0, and a final resume state.

    The engine runs it after every other hook so that its resume state includes their state after the step.
    Its own state (best accuracies, save counter, newest model file) is saved and restored as a hook state.

    Parameters
    ----------
    run_dir : str, where ``resume/`` lives
    prefix : str, insightface checkpoint prefix
    ckpt : int or CheckpointPolicy, ``--ckpt``
    period : int, steps between resume states (``verbose``)
    ckpt_embedding : bool, write model files cut at ``fc1_output`` without ``fc7*``
    keep : int, resume states kept
    """

    def __init__(self, run_dir, prefix, ckpt=CheckpointPolicy.BEST_OVERWRITE, period=2000, ckpt_embedding=True,
                 keep=KEEP_RESUME_STATES):
        self.run_dir = os.fspath(run_dir)
        self.prefix = os.fspath(prefix)
        self.policy = CheckpointPolicy(ckpt)
        self.period = int(period)
        self.ckpt_embedding = bool(ckpt_embedding)
        self.keep = keep
        self.highest = HighestAccuracy()
        self.save_step = 0
        self.last_model = ""          # newest insightface params file written
        self.last_resume_state = ""   # newest resume-state directory written or loaded

    @classmethod
    def from_config(cls, cfg, run_dir):
        return cls(run_dir, cfg.prefix, ckpt=cfg.ckpt, period=cfg.verbose, ckpt_embedding=cfg.ckpt_embedding)

    def last_good(self):
        """Newest resume state (else model file) written or loaded, "" when none."""
        return self.last_resume_state or self.last_model

    # ------------------------------------------------------------------ hook events
    def after_verification(self, trainer, results):
        self.save_step += 1
        is_highest = self.highest.update(r["acc"] for r in results.values())
        number = self.policy.decide(is_highest, self.save_step)
        if number is not None:
            logger.info("saving %d", number)
            self.save_model(trainer, number)
        logger.info("[%d]Accuracy-Highest: %1.5f", trainer.state.global_step, self.highest.best)

    def after_step(self, trainer):
        if trainer.state.global_step % self.period == 0:
            self.save_resume(trainer)

    def after_train(self, trainer):
        if self.policy is not CheckpointPolicy.NONE:
            logger.info("saving 0 (final weights, global step %d)", trainer.state.global_step)
            self.save_model(trainer, 0)
        self.save_resume(trainer)

    def state_dict(self):
        last = self.last_model
        if last and os.path.isabs(last) and _inside(last, self.run_dir):
            last = os.path.relpath(last, self.run_dir)
        return {"highest_acc": list(self.highest.highest_acc), "save_step": self.save_step, "last_model": last}

    def load_state_dict(self, state):
        self.highest = HighestAccuracy(state["highest_acc"])
        self.save_step = int(state["save_step"])
        last = state.get("last_model", "")
        # saved relative to the run directory, so that a copied run names its own files
        self.last_model = os.path.join(self.run_dir, last) if last and not os.path.isabs(last) else last

    # ------------------------------------------------------------------ writing and reading
    @staticmethod
    def _params(module):
        # BatchNorm's backward updates moving_mean/var outside MXNet's dependency tracking: without a full
        # sync, get_params can copy statistics from before the last update (seen: differences up to 0.4, r18).
        mx.nd.waitall()
        return module.get_params()

    def _finite_params(self, trainer, what):
        """The Module's parameters, or NonFiniteError when one holds NaN/inf (nothing is written then)."""
        arg_params, aux_params = self._params(trainer.module)
        bad = first_non_finite(arg_params, aux_params)
        if bad:
            state = trainer.state
            raise NonFiniteError(
                f"parameter {bad} holds NaN/inf at global step {state.global_step} (epoch {state.epoch}): the "
                f"{what} was NOT written. Training stopped; the last good checkpoint is intact: "
                f"{self.last_good() or 'none written yet'}. Lower --lr, add --warmup-steps, or pre-train with "
                "--loss softmax.")
        return arg_params, aux_params

    def save_model(self, trainer, number):
        """``prefix-%04d.params`` (+ symbol) of the Module's current weights; returns the params path."""
        arg_params, aux_params = self._finite_params(trainer, "model checkpoint %s-%04d.params" % (self.prefix,
                                                                                                   number))
        symbol = trainer.symbol
        if self.ckpt_embedding:
            symbol, arg_params, aux_params = embedding_checkpoint(symbol, arg_params, aux_params)
        self.last_model = save_checkpoint(self.prefix, number, symbol, arg_params, aux_params)
        return self.last_model

    def save_resume(self, trainer):
        """Write a resume state of the trainer at its current step; returns the directory."""
        arg_params, aux_params = self._finite_params(trainer, "resume state")
        payload = trainer.state.to_json()
        payload["config"] = dict(trainer.config)
        payload["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        payload["metric"] = trainer.metric_state()
        payload["hooks"] = trainer.hook_states()
        get_iter_state = getattr(trainer.train_iter, "state_dict", None)
        self.last_resume_state = save_resume_state(
            self.run_dir, payload, arg_params, aux_params, lambda path: save_optimizer_states(trainer.module, path),
            symbol_json=portable_json(trainer.symbol), iterator_state=get_iter_state() if get_iter_state else None,
            keep=self.keep)
        return self.last_resume_state

    def load_latest(self, symbol=None):
        """:func:`load_resume_state` of the run directory (remembered as the last good state)."""
        resume = load_resume_state(self.run_dir, symbol)
        self.last_resume_state = resume.path
        return resume


# --------------------------------------------------------------------------------------------- run directory

def _inside(path, directory):
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


class RunDirLock:
    """``fcntl.flock`` on ``<run_dir>/.lock`` for the life of a training (context manager).

    A second training in the same directory fails at once (:class:`RunLockedError` naming the holder's PID).
    On acquisition, temporaries of killed writers (``.tmp-*``) and incomplete ``resume/step-*`` directories are
    removed: with the lock held, no other writer of this run can be alive. The lock disappears with the process
    (also on ``kill -9``), so a stale lock file never blocks.
    """

    def __init__(self, run_dir):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self._fd = None

    def acquire(self):
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode(PRIVATE_FILE))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"run directory {self.run_dir} is in use by another training (PID {holder}, lock "
                                 f"{self.path}); wait for it to finish, stop it, or train into another "
                                 "directory (--prefix / --models-root)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        clean_run_dir(self.run_dir)
        return self

    def release(self):
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def clean_run_dir(run_dir):
    """Remove what killed writers left in a run directory: ``.tmp-*`` files/directories (of dead processes) and
    ``resume/step-*`` directories without ``state.json`` (call with the run lock held). Returns removed paths."""
    removed = clean_stale_temporaries(run_dir, recursive_dirs=(RESUME_DIR,))
    root = _resume_root(run_dir)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            full = os.path.join(root, name)
            if name.startswith("step-") and os.path.isdir(full) and not os.path.isfile(os.path.join(full, STATE_FILE)):
                shutil.rmtree(full, ignore_errors=True)
                removed.append(full)
                logger.info("removed incomplete resume state %s", full)
    return removed
