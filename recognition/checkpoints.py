"""Checkpoints: insightface's files written atomically, plus a resumable training state.

Files in a run directory (prefix ``<run_dir>/model`` by default)
-----------------------------------------------------------------
``model-symbol.json`` / ``model-%04d.params``
    Exactly what ``mx.model.save_checkpoint`` writes (``arg:<name>`` / ``aux:<name>`` keys, CPU arrays) and
    ``mx.model.load_checkpoint`` reads. With ``ckpt_embedding`` the symbol is cut at ``fc1_output`` and every
    ``fc7*`` argument is dropped (HEAD's deployable format).
``resume/step-%010d/``
    Everything needed to continue: ``state.json`` (global step, epoch, batch within the epoch, lr, best
    accuracies, save counter, seed, config), ``full.params`` (all args incl. ``fc7`` + aux) and
    ``optimizer.states`` (momentum buffers). The directory is assembled under a temporary name and renamed into
    place, so it is either complete or absent; the two newest are kept.

Every file is written to a temporary file in the same directory, flushed and fsync'd, then ``os.replace``'d
over the destination, so a ``kill -9`` at any moment leaves the previous version loadable.
"""
import json
import logging
import os
import shutil
import tempfile

import mxnet as mx

from iterators.formats.atomic import atomic_write, atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

RESUME_DIR = "resume"
STATE_FILE = "state.json"
PARAMS_FILE = "full.params"
OPTIMIZER_FILE = "optimizer.states"
SYMBOL_FILE = "symbol.json"  # training symbol of the run, compared on resume
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


def save_resume_state(run_dir, state, arg_params, aux_params, save_optimizer, symbol_json=None):
    """Write ``resume/step-%010d`` atomically (temp directory + rename) and prune old states.

    Parameters
    ----------
    state : dict (JSON-serialisable), must contain ``global_step``
    save_optimizer : callable(path) writing the optimizer states file (``Module.save_optimizer_states``)
    symbol_json : str or None, the full training symbol (``symbol.json``), checked when resuming

    Returns
    -------
    Path of the new state directory.
    """
    root = _resume_root(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, "step-%010d" % state["global_step"])
    tmp = tempfile.mkdtemp(prefix=".tmp-step-", dir=root)
    try:
        save_params(os.path.join(tmp, PARAMS_FILE), arg_params, aux_params)
        atomic_write(os.path.join(tmp, OPTIMIZER_FILE), save_optimizer)
        if symbol_json is not None:
            atomic_write_text(os.path.join(tmp, SYMBOL_FILE), symbol_json)
        atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2, default=str) + "\n")
        if os.path.isdir(final):  # same step saved twice (e.g. max_steps on a verification step)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    for old in list_resume_states(run_dir)[:-KEEP_RESUME_STATES]:
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(root):  # leftovers of a killed save
        if name.startswith(".tmp-"):
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


def load_resume_state(run_dir, symbol=None):
    """Newest resume state of ``run_dir`` -> ``(state dict, arg_params, aux_params, optimizer_states_path)``.

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
    return state, arg_params, aux_params, os.path.join(path, OPTIMIZER_FILE)
