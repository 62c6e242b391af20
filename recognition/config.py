"""Configuration: ``configs/base.py`` -> preset chain -> overrides, validated, saved with the run.

API (the triplet trainer codes against it)
------------------------------------------
* Presets: ``configs/<name>.py`` is a Python file with a module-level dict ``config`` holding ONLY overrides
  of ``configs/base.py`` keys, and optionally ``base = "<other preset file name>"`` (resolved relative to the
  preset's own directory) to build on another preset. Chains are applied root first.
* :func:`load_config` ``(path=None, overrides=None) -> EasyDict``: base -> preset chain -> overrides. An
  unknown key, a value of the wrong type or an invalid value raises :class:`ConfigError` naming the key, the
  source (preset file or "overrides") and, for unknown keys, the closest valid key (``difflib``).
* :func:`build_arg_parser` / :func:`parse_args` ``(argv, extra_defaults=None, parser=None) -> EasyDict``:
  insightface's kebab-case flags. Every flag's ``dest`` is a config key, so a caller (``train_triplet``) can
  add its own flags to the parser returned by :func:`build_arg_parser` with ``dest=<config key>`` and
  ``default=None`` and they override the config like the built-in ones. Precedence (lowest first):
  ``configs/base.py`` < ``extra_defaults`` < the named network/loss presets (``symbols.NETWORK_PRESETS``,
  ``symbols.losses.HEAD_PRESETS``, as HEAD's ``generate_config``) < ``--config`` preset chain
  < ``--set key=value`` < flags.
  ``--resume RUN_DIR`` starts from the run's saved ``config.json`` instead, then applies the flags.

Names: ``network``, ``loss`` and ``net_output`` are validated against the symbols registries
(``symbols.registry.NETWORKS``, ``HEADS``, ``FC_TYPES``) and ``--help`` lists their names, so a network or head
registered with one decorator is accepted here without any edit (:func:`valid_names`).

Derived values (global batch, ``num_classes`` from ``property``, run directory, checkpoint prefix) are
computed once by :func:`resolve_run_config` and never by mutating the parsed flags later.
"""
import argparse
import copy
import difflib
import importlib.util
import json
import logging
import math
import os
import re

from easydict import EasyDict as edict

from iterators.formats.images import parse_image_size

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "config.json"  # resolved config saved in every run directory (read back by --resume)
RUN_RELATIVE_KEYS = ("prefix", "resume")  # path keys stored relative to the run directory in config.json
RUN_RELATIVE_MARK = "_relative_to_run_dir"  # config.json entry listing them (not a config key)

CKPT_MODES = {0: "none", 1: "best", 2: "always", 3: "best_overwrite"}  # insightface --ckpt meanings
KVSTORES = ("device", "local", "dist_sync", "dist_device_sync", "dist_async")
_CTX_RE = re.compile(r"^cpu(:[1-9][0-9]*)?$")
_GPUS_RE = re.compile(r"^[0-9]+(,[0-9]+)*$")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used (the message names it and the fix)."""


def _registries():
    """``{config key: registry}`` for the keys whose valid values are registered names (symbols.registry)."""
    from symbols.registry import FC_TYPES, HEADS, NETWORKS
    return {"network": NETWORKS, "loss": HEADS, "net_output": FC_TYPES}


def valid_names(key):
    """Sorted registered names a config key accepts: ``network``, ``loss`` or ``net_output``."""
    return _registries()[key].names()


def __getattr__(name):
    """Former name tuples, now read from the symbols registries (``LOSSES``, ``NET_OUTPUTS``, ``NETWORKS``)."""
    keys = {"LOSSES": "loss", "NET_OUTPUTS": "net_output", "NETWORKS": "network"}
    if name in keys:
        return tuple(valid_names(keys[name]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _base_config():
    from configs.base import config as base
    return copy.deepcopy(base)


def valid_keys():
    """Sorted list of every configuration key (the keys of ``configs/base.py``)."""
    return sorted(_base_config().keys())


def _suggest(key, keys):
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(key, value, default, source):
    """Return ``value`` converted to the type of ``default`` or raise ConfigError naming key and source."""
    where = f"{source}: config key '{key}'"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("0", "1", "true", "false", "yes", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ConfigError(f"{where} must be a boolean (true/false/0/1), got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list (or a comma-separated string), got {value!r}")
        if default:
            return [_coerce(f"{key}[{i}]", v, default[0], source) for i, v in enumerate(value)]
        return list(value)
    return value


def _apply(cfg, overrides, source, keys):
    for key, value in overrides.items():
        if key not in keys:
            raise ConfigError(f"{source}: unknown config key '{key}'{_suggest(key, keys)} "
                              f"(valid keys are listed in configs/base.py)")
        cfg[key] = _coerce(key, value, keys[key], source)


def _apply_named_presets(cfg, explicit):
    """Fill the keys a named network / loss implies, unless a layer set them explicitly.

    insightface HEAD's ``generate_config(network, dataset, loss)`` copies the loss preset and then the
    network preset over the defaults, and only then applies the command line. Without this, ``--loss cosface``
    would keep base's ``loss_m2 = 0.5`` (a combined margin, silently) and ``--network y2`` base's ``net_blocks``.
    ``explicit`` holds the keys given by a preset file, ``--set`` or a flag: those always win.
    """
    import symbols
    from symbols.losses import HEAD_PRESETS
    implied = {**HEAD_PRESETS.get(cfg["loss"], {}), **symbols.NETWORK_PRESETS.get(cfg["network"], {})}
    for key, value in implied.items():
        if key in cfg and key not in explicit:
            cfg[key] = copy.deepcopy(value)


def _load_preset_chain(path, seen=None):
    """Return [(path, overrides)] root first for the preset file ``path`` and its ``base`` chain."""
    path = os.path.abspath(os.fspath(path))
    seen = seen or []
    if path in seen:
        raise ConfigError(f"{path}: preset 'base' chain loops: {' -> '.join(seen + [path])}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (give a path such as configs/orl_demo.py)")
    if not path.endswith(".py"):
        raise ConfigError(f"--config {path}: a preset is a Python file (configs/<name>.py defining a dict `config`); "
                          "a run's config.json is read back with --resume <run directory>")
    spec = importlib.util.spec_from_file_location(f"_preset_{len(seen)}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: {exc.msg} (a preset must be valid Python)") from None
    except Exception as exc:  # noqa: BLE001 - the preset's own code failed
        raise ConfigError(f"{path}: the preset raised {type(exc).__name__}: {exc}") from None
    overrides = getattr(module, "config", None)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: a preset must define a module-level dict `config` of overrides")
    chain = []
    parent = getattr(module, "base", None)
    if parent:
        chain = _load_preset_chain(os.path.join(os.path.dirname(path), parent), seen + [path])
    return chain + [(path, dict(overrides))]


def validate(cfg):
    """Check values (not just types) of a full config; raise ConfigError naming the key and the fix."""
    def bad(key, why):
        raise ConfigError(f"config key '{key}' = {cfg[key]!r}: {why}")

    if cfg.ckpt not in CKPT_MODES:
        bad("ckpt", f"must be one of {sorted(CKPT_MODES)} ({', '.join(f'{k}={v}' for k, v in CKPT_MODES.items())})")
    if cfg.kvstore not in KVSTORES:
        bad("kvstore", f"must be one of {', '.join(KVSTORES)}")
    for key, registry in _registries().items():
        if cfg[key] not in registry:
            names = registry.names()
            bad(key, f"must be one of {', '.join(names)}{_suggest(cfg[key], names)}")
    for key, value in cfg.items():  # nan/inf pass every comparison below (nan > 0 and nan < 0 are both False)
        if isinstance(value, float) and not math.isfinite(value):
            bad(key, "must be a finite number")
    for key in ("loss_m2", "loss_m3"):  # the heads apply a margin only when it is > 0
        if cfg[key] < 0:
            bad(key, "a margin must be >= 0 (0 = no margin)")
    if cfg.loss_m1 <= 0:
        bad("loss_m1", "the multiplicative margin must be > 0 (1 = none)")
    for key in ("per_batch_size", "emb_size", "frequent", "verbose", "end_epoch"):
        if cfg[key] <= 0:
            bad(key, "must be a positive integer")
    for key in ("lr", "loss_s", "net_multiplier"):
        if not cfg[key] > 0:
            bad(key, "must be > 0")
    for key in ("wd", "warmup_steps", "max_steps", "num_classes", "data_cutoff", "data_images_filter"):
        if cfg[key] < 0:
            bad(key, "must be >= 0")
    if not 0.0 <= cfg.mom < 1.0:
        bad("mom", "momentum must be in [0, 1)")
    if any(s <= 0 for s in cfg.lr_steps) or list(cfg.lr_steps) != sorted(set(cfg.lr_steps)):
        bad("lr_steps", "must be strictly increasing positive global-batch counts, e.g. 100000,160000,220000")
    if len(cfg.image_shape) != 3 or cfg.image_shape[0] != cfg.image_shape[1] or cfg.image_shape[2] != 3:
        bad("image_shape", "must be [H, W, 3] with H == W (square RGB input)")
    if cfg.data_color not in (0, 1, 2):
        bad("data_color", "must be 0 (off), 1 (jitter) or 2 (jitter + JPEG)")
    if cfg.data_workers < 1:
        bad("data_workers", "must be >= 1")
    if cfg.ctx and not _CTX_RE.match(cfg.ctx):
        bad("ctx", "must be 'cpu' or 'cpu:N' (N CPU contexts, data parallel)")
    if cfg.gpus and not _GPUS_RE.match(cfg.gpus):
        bad("gpus", "must be a comma list of GPU ids such as 0,1")
    if cfg.gpus and cfg.ctx:
        bad("ctx", "give either --gpus or --ctx, not both")
    if cfg.dist_timeout < 0:
        bad("dist_timeout", "must be >= 0 seconds (0 = no watchdog)")
    try:
        from recognition.distributed import backend_kind
        backend_kind(cfg.dist, cfg.kvstore)
    except ValueError as exc:
        bad("dist" if cfg.dist != "none" else "kvstore", str(exc))
    if not 0.0 < cfg.sample_rate <= 1.0:
        bad("sample_rate", "Partial FC sample rate must be in (0, 1] (1 = every class, e.g. 0.1 = 10%)")
    if cfg.fp16_scale < 0 or not math.isfinite(cfg.fp16_scale):
        bad("fp16_scale", "must be a finite loss scale >= 0 (0 = the default 65536)")
    if cfg.fp16_scale > 0:
        cfg.fp16 = True  # insightface train_parall: --fp16-scale > 0 turns fp16 on
    if cfg.fp16 and (_registries()["loss"].lookup(cfg.loss).is_triplet or cfg.model_parallel or cfg.sample_rate < 1.0
                     or cfg.dist != "none" or cfg.kvstore.startswith("dist")):
        bad("fp16", "float16 training needs a softmax-family loss in one process without --model-parallel / "
            "--sample-rate (overflow skips are not synchronised across ranks)")
    if (cfg.model_parallel or cfg.sample_rate < 1.0) and _registries()["loss"].lookup(cfg.loss).is_triplet:
        bad("model_parallel" if cfg.model_parallel else "sample_rate", "model-parallel fc7 / Partial FC need a "
            "softmax-family loss (a triplet head has no fc7)")
    if cfg.pretrained and cfg.pretrained.count(",") > 1:
        bad("pretrained", "must be 'prefix' or 'prefix,epoch'")
    if _registries()["loss"].lookup(cfg.loss).is_triplet and cfg.per_batch_size % 3:
        bad("per_batch_size", "triplet batches are [anchors|positives|negatives]: must be divisible by 3")
    return cfg


def load_config(path=None, overrides=None):
    """Build a validated config: ``configs/base.py`` -> preset chain of ``path`` -> ``overrides``.

    Parameters
    ----------
    path : str or None
        Preset file (``configs/<name>.py``) with a dict ``config`` and optional ``base = "<preset>.py"``.
    overrides : dict or None
        Final key -> value overrides (strings are converted to the key's type).

    Returns
    -------
    EasyDict with every key of ``configs/base.py``.
    """
    cfg = _base_config()
    keys = dict(cfg)
    explicit = set()
    if path:
        for preset_path, preset in _load_preset_chain(path):
            _apply(cfg, preset, preset_path, keys)
            explicit.update(preset)
    if overrides:
        _apply(cfg, overrides, "overrides", keys)
        explicit.update(overrides)
    _apply_named_presets(cfg, explicit)
    return validate(edict(cfg))


def load_run_config(run_dir, overrides=None):
    """Load ``<run_dir>/config.json`` (written by the engine) and apply ``overrides``."""
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE_NAME} there; give the run directory that "
                          "training created (it holds training.log, config.json and resume/)")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as exc:
        raise ConfigError(f"--resume {run_dir}: {path} is not readable JSON ({exc})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume {run_dir}: {path} does not hold a config object")
    for key in saved.get(RUN_RELATIVE_MARK, []):  # paths stored relative to the run directory
        if isinstance(saved.get(key), str):
            saved[key] = os.path.join(os.fspath(run_dir), saved[key])
    prefix = saved.get("prefix")
    if isinstance(prefix, str) and prefix and not _inside(prefix, run_dir):
        # an older config.json with an absolute prefix, in a copied/moved run: write into THIS directory
        rebased = os.path.join(os.fspath(run_dir), os.path.basename(prefix))
        logger.warning("%s: prefix %s is outside the run directory (copied or moved run); checkpoints go to %s",
                       path, prefix, rebased)
        saved["prefix"] = rebased
    cfg = _base_config()
    keys = dict(cfg)
    _apply(cfg, {k: v for k, v in saved.items() if k in keys}, path, keys)
    if overrides:
        _apply(cfg, overrides, "overrides", keys)
    cfg["resume"] = os.fspath(run_dir)
    return validate(edict(cfg))


def _inside(path, directory):
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return os.path.dirname(path) == directory or path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def save_config(cfg, run_dir):
    """Write the resolved config as ``<run_dir>/config.json`` atomically; returns the path."""
    from iterators.formats.atomic import PRIVATE_FILE, atomic_write_text
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE_NAME)
    data, relative = dict(cfg), []
    for key in RUN_RELATIVE_KEYS:  # so that a copied run directory writes into the copy when resumed
        value = data.get(key)
        if isinstance(value, str) and value and _inside(value, run_dir):
            data[key] = os.path.relpath(os.path.abspath(value), os.path.abspath(run_dir))
            relative.append(key)
    data[RUN_RELATIVE_MARK] = relative
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", mode=PRIVATE_FILE)
    return path


def _int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def _image_size(text):
    try:
        return list(parse_image_size(text)) + [3]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _legacy_loss(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--loss-type takes insightface's integer codes, got {text!r}") from None


EPILOG = """examples:
  python -m recognition.train_softmax --config configs/synthetic.py --max-steps 50
  python -m recognition.train_softmax --network r100 --loss arcface --data-dir ../datasets/faces_emore --gpus 0,1
  python -m recognition.train_softmax --resume models/r18-arcface-orl --max-steps 4000
"""


def build_arg_parser(description="Train a face-recognition network (insightface train_softmax).", epilog=EPILOG):
    """Parser with insightface's kebab-case flags; every ``dest`` is a config key (``default=None``).

    Callers may add flags (``parser.add_argument('--triplet-alpha', dest='triplet_alpha', type=float,
    default=None)``) before calling :func:`parse_args` with ``parser=``.
    """
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(group, flag, dest, type_=str, help_=None, **kw):
        group.add_argument(flag, dest=dest, type=type_, default=None, help=help_ or f"config key {dest}", **kw)

    g = p.add_argument_group("configuration")
    g.add_argument("--config", default=None, help="preset file (configs/<name>.py) applied on configs/base.py")
    g.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set data_workers=4")
    add(g, "--resume", "resume", help_="run directory to continue (weights, optimizer, step, lr, best acc)")

    g = p.add_argument_group("data")
    add(g, "--data-dir", "dataset_path", help_="dir with train.rec/.idx, property and <target>.bin")
    add(g, "--dataset", "dataset")
    add(g, "--num-classes", "num_classes", int, "0 = read from <data-dir>/property")
    add(g, "--image-size", "image_shape", _image_size, "H,W (square)")
    add(g, "--target", "val_targets", _str_list, "verification packs, e.g. lfw,cfp_fp,agedb_30")
    add(g, "--rand-mirror", "data_rand_mirror", int)
    add(g, "--cutoff", "data_cutoff", int)
    add(g, "--color", "data_color", int)
    add(g, "--images-filter", "data_images_filter", int)
    add(g, "--data-workers", "data_workers", int)
    add(g, "--seed", "seed", int)

    g = p.add_argument_group("network")
    add(g, "--network", "network", help_=" ".join(valid_names("network")))
    add(g, "--emb-size", "emb_size", int)
    add(g, "--version-se", "net_se", int)
    add(g, "--version-input", "net_input", int)
    add(g, "--version-output", "net_output", help_="embedding head (fc type): " + " ".join(valid_names("net_output")))
    add(g, "--version-unit", "net_unit", int)
    add(g, "--version-act", "net_act")
    add(g, "--version-multiplier", "net_multiplier", float)
    add(g, "--bn-mom", "bn_mom", float)

    g = p.add_argument_group("head")
    add(g, "--loss", "loss", help_=" ".join(valid_names("loss")))
    add(g, "--loss-type", "loss_type", _legacy_loss, "insightface OLD integer loss type (mapped to --loss)")
    add(g, "--margin-s", "loss_s", float)
    add(g, "--margin-m", "loss_m2", float, "additive angular margin m2")
    add(g, "--margin-a", "loss_m1", float, "multiplicative angular margin m1")
    add(g, "--margin-b", "loss_m3", float, "additive cosine margin m3")
    add(g, "--easy-margin", "easy_margin", int)
    add(g, "--fc7-lr-mult", "fc7_lr_mult", float)
    add(g, "--fc7-wd-mult", "fc7_wd_mult", float)
    g.add_argument("--fc7-no-bias", dest="fc7_no_bias", action="store_const", const=True, default=None)
    add(g, "--ce-loss", "ce_loss", int, "1 = add the displayed CE output")

    g = p.add_argument_group("optimisation")
    add(g, "--per-batch-size", "per_batch_size", int, "images per device")
    add(g, "--lr", "lr", float)
    add(g, "--lr-steps", "lr_steps", _int_list, "global batches after which lr *= 0.1, e.g. 100000,160000")
    add(g, "--warmup-steps", "warmup_steps", int)
    add(g, "--wd", "wd", float)
    add(g, "--mom", "mom", float)
    add(g, "--honour-param-mults", "honour_param_mults", int)
    add(g, "--max-steps", "max_steps", int)
    add(g, "--end-epoch", "end_epoch", int)
    add(g, "--gpus", "gpus", help_="GPU ids, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES when GPUs exist, else CPU)")
    add(g, "--ctx", "ctx", help_="CPU contexts: cpu or cpu:N")
    add(g, "--kvstore", "kvstore", help_=" ".join(KVSTORES))
    add(g, "--dist", "dist", help_="none | horovod (under horovodrun) | kvstore (ps-lite, under recognition.launch)")
    add(g, "--dist-timeout", "dist_timeout", int, "seconds a rank waits for the others before the job stops")
    add(g, "--model-parallel", "model_parallel", int, "1 = fc7 split by class over the devices (train_parall)")
    add(g, "--sample-rate", "sample_rate", float, "Partial FC: fraction of each shard's classes trained per step")
    add(g, "--fp16", "fp16", int, "1 = float16 body with float32 master weights and dynamic loss scaling (GPU)")
    add(g, "--fp16-scale", "fp16_scale", float, "initial loss scale; > 0 implies --fp16 (insightface train_parall)")

    g = p.add_argument_group("logging, verification, checkpoints")
    add(g, "--frequent", "frequent", int)
    add(g, "--verbose", "verbose", int, "verification period in global batches")
    add(g, "--ckpt", "ckpt", int, ", ".join(f"{k}={v}" for k, v in CKPT_MODES.items()))
    add(g, "--ckpt-embedding", "ckpt_embedding", int)
    add(g, "--models-root", "models_root")
    add(g, "--prefix", "prefix")
    add(g, "--pretrained", "pretrained", help_="prefix,epoch: load weights only (fc7 may be missing)")
    add(g, "--pretrained-epoch", "pretrained_epoch", int)
    return p


_NON_CONFIG_DESTS = {"config", "set_values", "loss_type"}
_LEGACY_MARGIN_DESTS = ("loss_s", "loss_m1", "loss_m2", "loss_m3", "easy_margin")


def _legacy_loss_overrides(code, args):
    """OLD ``--loss-type N`` + its margin flags -> HEAD keys, through symbols' single mapping table."""
    from symbols.losses import legacy_loss_config
    base = _base_config()

    def flag(dest):
        value = getattr(args, dest)
        return base[dest] if value is None else value
    try:
        return legacy_loss_config(code, margin_s=flag("loss_s"), margin_m=flag("loss_m2"), margin_a=flag("loss_m1"),
                                  margin_b=flag("loss_m3"), easy_margin=flag("easy_margin"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def parse_args(argv=None, extra_defaults=None, parser=None):
    """Parse insightface-style flags into a validated config (see the module docstring for precedence).

    Parameters
    ----------
    argv : list of str or None (``sys.argv[1:]``)
    extra_defaults : dict or None
        Defaults of the calling trainer applied just above ``configs/base.py`` (e.g. ``{'loss': 'triplet'}``).
    parser : argparse.ArgumentParser or None
        A parser from :func:`build_arg_parser`, possibly with extra flags whose ``dest`` are config keys.
    """
    parser = parser or build_arg_parser()
    args = parser.parse_args(argv)
    keys = dict(_base_config())
    flags = {dest: value for dest, value in vars(args).items()
             if dest not in _NON_CONFIG_DESTS and value is not None}
    if args.loss_type is not None:
        # With OLD --loss-type the margin flags keep their OLD meaning (e.g. --margin-m is m3 for CosFace):
        # the symbols table maps them, so they are not applied as HEAD keys directly.
        for dest in _LEGACY_MARGIN_DESTS:
            flags.pop(dest, None)
        flags.update(_legacy_loss_overrides(args.loss_type, args))
    set_values = {}
    for item in args.set_values:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data_workers=4")
        key, value = item.split("=", 1)
        set_values[key.strip()] = value
    if args.resume:
        cfg = load_run_config(args.resume, {**set_values, **flags})
        return cfg
    cfg = _base_config()
    if extra_defaults:
        _apply(cfg, extra_defaults, "extra_defaults", keys)
    explicit = set(set_values) | set(flags)
    if args.config:
        for preset_path, preset in _load_preset_chain(args.config):
            _apply(cfg, preset, preset_path, keys)
            explicit.update(preset)
    _apply(cfg, set_values, "--set", keys)
    _apply(cfg, flags, "command line", keys)
    _apply_named_presets(cfg, explicit)
    cfg = validate(edict(cfg))
    if "image_shape" in flags or "image_shape" in set_values:
        _check_image_size_against_property(cfg)
    return cfg


def _check_image_size_against_property(cfg):
    """An explicit ``--image-size`` must match ``<data-dir>/property``: the iterator would otherwise resize every
    image (silently up- or down-scaling the faces the network sees)."""
    prop = os.path.join(cfg.dataset_path, "property")
    if not os.path.isfile(prop):
        return
    from iterators.formats.recordio import read_property
    _, (height, width) = read_property(cfg.dataset_path)
    if [height, width] != list(cfg.image_shape[:2]):
        raise ConfigError(f"--image-size {cfg.image_shape[0]},{cfg.image_shape[1]} but {prop} says the images are "
                          f"{height}x{width}; drop --image-size (it is read from property) or rebuild the dataset "
                          f"at that size (python -m iterators.tools.build_rec --resize {cfg.image_shape[0]},"
                          f"{cfg.image_shape[1]})")
