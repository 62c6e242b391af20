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
import json
import logging
import os
import shutil
import tempfile
import time
import typing

import mxnet as mx

from iterators.formats.atomic import TMP_PREFIX, atomic_write, atomic_write_text, fsync_dir
from recognition.hooks import Hook

logger = logging.getLogger(__name__)

RESUME_DIR = "resume"
STATE_FILE = "state.json"
PARAMS_FILE = "full.params"
OPTIMIZER_FILE = "optimizer.states"
SYMBOL_FILE = "symbol.json"  # training symbol of the run, compared on resume
ITERATOR_FILE = "iterator.json"  # train_iter.state_dict(), restored instead of replaying the data
KEEP_RESUME_STATES = 2  # newest complete resume states kept (older ones are deleted after a new one lands)


def save_params(path, arg_params, aux_params):
    """``nd.save`` the ``arg:``/``aux:`` dict of ``mx.model.save_checkpoint`` to ``path`` atomically."""
    payload = {f"arg:{k}": v.as_in_context(mx.cpu()) for k, v in arg_params.items()}
    payload.update({f"aux:{k}": v.as_in_context(mx.cpu()) for k, v in aux_params.items()})
    return atomic_write(path, lambda tmp: mx.nd.save(tmp, payload))


def load_params(path):
    """Read an ``arg:``/``aux:`` params file -> ``(arg_params, aux_params)`` with a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"params file not found: {path}")
    arg_params, aux_params = {}, {}
    for key, value in mx.nd.load(path).items():
        kind, _, name = key.partition(":")
        if kind == "arg":
            arg_params[name] = value
        elif kind == "aux":
            aux_params[name] = value
        else:
            raise ValueError(f"{path}: key {key!r} is not 'arg:<name>' or 'aux:<name>' (not an MXNet checkpoint)")
    return arg_params, aux_params


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
    sym_json = symbol.tojson()
    if hasattr(symbol, "_remove_amp_cast"):  # as mx.model.save_checkpoint(remove_amp_cast=True)
        sym_json = symbol._remove_amp_cast().tojson()
    atomic_write_text(f"{prefix}-symbol.json", sym_json)
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
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, "step-%010d" % state["global_step"])
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX + "step-", dir=root)
    try:
        save_params(os.path.join(tmp, PARAMS_FILE), arg_params, aux_params)
        atomic_write(os.path.join(tmp, OPTIMIZER_FILE), save_optimizer)
        if symbol_json is not None:
            atomic_write_text(os.path.join(tmp, SYMBOL_FILE), symbol_json)
        if iterator_state is not None:
            atomic_write_text(os.path.join(tmp, ITERATOR_FILE), json.dumps(iterator_state) + "\n")
        atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2, default=str) + "\n")
        if os.path.isdir(final):  # same step saved twice (e.g. max_steps on a verification step)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    for old in list_resume_states(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(root):  # leftovers of a killed save
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
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


def load_resume_state(run_dir, symbol=None):
    """Newest resume state of ``run_dir`` -> :class:`ResumeState` ``(state, arg_params, aux_params,
    optimizer_path)``.

    With ``symbol``, its arguments/aux states must equal the saved symbol's (else ValueError: network changed).
    """
    states = list_resume_states(run_dir)
    if not states:
        raise FileNotFoundError(f"--resume {run_dir}: no resume state in {_resume_root(run_dir)} (the run saved "
                                "none yet: it writes one every `verbose` batches and when it stops)")
    path = states[-1]
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    saved_symbol = os.path.join(path, SYMBOL_FILE)
    if symbol is not None and os.path.isfile(saved_symbol):
        # compare parameters, not JSON: auto-generated node names (blockgrad0/1...) differ between builds
        saved = mx.sym.load(saved_symbol)
        if (saved.list_arguments(), saved.list_auxiliary_states()) != (symbol.list_arguments(),
                                                                     symbol.list_auxiliary_states()):
            raise ValueError(f"--resume {run_dir}: the training symbol's parameters differ from those saved in "
                             f"{saved_symbol}; resume with the run's own network/head settings (drop the flags "
                             "that change them) or start a new run with --pretrained")
    arg_params, aux_params = load_params(os.path.join(path, PARAMS_FILE))
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
        return {"highest_acc": list(self.highest.highest_acc), "save_step": self.save_step,
                "last_model": self.last_model}

    def load_state_dict(self, state):
        self.highest = HighestAccuracy(state["highest_acc"])
        self.save_step = int(state["save_step"])
        self.last_model = state.get("last_model", "")

    # ------------------------------------------------------------------ writing and reading
    @staticmethod
    def _params(module):
        # BatchNorm's backward updates moving_mean/var outside MXNet's dependency tracking: without a full
        # sync, get_params can copy statistics from before the last update (seen: differences up to 0.4, r18).
        mx.nd.waitall()
        return module.get_params()

    def save_model(self, trainer, number):
        """``prefix-%04d.params`` (+ symbol) of the Module's current weights; returns the params path."""
        arg_params, aux_params = self._params(trainer.module)
        symbol = trainer.symbol
        if self.ckpt_embedding:
            symbol, arg_params, aux_params = embedding_checkpoint(symbol, arg_params, aux_params)
        self.last_model = save_checkpoint(self.prefix, number, symbol, arg_params, aux_params)
        return self.last_model

    def save_resume(self, trainer):
        """Write a resume state of the trainer at its current step; returns the directory."""
        arg_params, aux_params = self._params(trainer.module)
        payload = trainer.state.to_json()
        payload["config"] = dict(trainer.config)
        payload["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        payload["metric"] = trainer.metric_state()
        payload["hooks"] = trainer.hook_states()
        get_iter_state = getattr(trainer.train_iter, "state_dict", None)
        self.last_resume_state = save_resume_state(
            self.run_dir, payload, arg_params, aux_params, trainer.module.save_optimizer_states,
            symbol_json=trainer.symbol.tojson(), iterator_state=get_iter_state() if get_iter_state else None,
            keep=self.keep)
        return self.last_resume_state

    def load_latest(self, symbol=None):
        """:func:`load_resume_state` of the run directory (remembered as the last good state)."""
        resume = load_resume_state(self.run_dir, symbol)
        self.last_resume_state = resume.path
        return resume
