"""Network builders, embedding heads and loss heads faithful to insightface.

Sources: insightface HEAD 7fadd420 ``recognition/arcface_mxnet/train.py::get_symbol`` (the training symbol),
``recognition/arcface_mxnet/symbol/`` (fresnet, fmobilefacenet, symbol_utils.get_fc1) and ``sample_config.py``
(network / loss presets); OLD ``src/train_softmax.py`` at 0972924a.

Public API
----------
- Registries (:mod:`symbols.registry`): :data:`NETWORKS`, :data:`FC_TYPES`, :data:`HEADS`, filled by the
  decorators :func:`register_network`, :func:`register_fc_type`, :func:`register_head`. They are the only lists
  of names: the config validation and ``--help`` of :mod:`recognition.config` query them.
- :func:`list_networks` -> sorted network names (``r18`` ... ``r269``, ``r100fc``, ``r50v1``, ``y1``, ``y2``).
- :func:`get_embedding` (network, emb_size=512, fc_type='E', **options) -> Symbol ``data`` -> ``fc1_output``.
- :func:`get_symbol` (config) -> grouped training Symbol (insightface's output order); the one adapter from a
  config dict to the builders.
- :func:`get_initializer` (network) -> ``mx.init.Initializer`` (per-variable ``__init__`` attrs win).
- :data:`NETWORK_PRESETS`, :data:`symbols.losses.HEAD_PRESETS`: live views of the registered presets.

This package does not import ``configs`` or ``recognition``: :data:`CONFIG_DEFAULTS` and the builders' keyword
defaults equal ``configs/base.py``'s values (tests/test_registry.py compares them).
"""
import logging

import mxnet as mx

from . import registry
from .registry import (FC_TYPES, HEADS, INITIALIZER_FAMILIES, NETWORKS, PresetsView, UnknownNameError,
                       register_fc_type, register_head, register_network)
# Importing the builder modules registers their networks, fc types and heads.
from . import fmobilefacenet, fmobilenet, fresnet, heads, losses  # noqa: F401
from .heads import get_fc1, list_fc_types

logger = logging.getLogger(__name__)

__all__ = ["NETWORKS", "FC_TYPES", "HEADS", "NETWORK_PRESETS", "NET_OPTIONS", "CONFIG_DEFAULTS", "UnknownNameError",
           "register_network", "register_fc_type", "register_head", "get_embedding", "get_symbol",
           "get_initializer", "list_networks", "list_fc_types", "net_options", "get_fc1", "losses", "registry"]

# Per-network config defaults (HEAD sample_config ``network.<name>``), a live view of the registry: they fill keys
# MISSING from the config given to get_symbol (HEAD lets the network preset override the generic defaults).
NETWORK_PRESETS = PresetsView(NETWORKS)

# Values get_symbol uses for keys missing from its config (after the network and head presets); equal to
# configs/base.py's. Network options are not listed: a missing option takes the builder's keyword default.
CONFIG_DEFAULTS = {
    "network": "r100",
    "emb_size": 512,
    "net_output": "E",
    "loss": "arcface",
    "num_classes": 0,
    "per_batch_size": 128,
    "loss_s": 64.0,
    "loss_m1": 1.0,
    "loss_m2": 0.5,
    "loss_m3": 0.0,
    "easy_margin": 0,
    "fc7_no_bias": False,
    "fc7_lr_mult": 1.0,
    "fc7_wd_mult": 1.0,
    "ce_loss": True,
    "triplet_alpha": 0.3,
}


def list_networks():
    """Sorted list of registered network names."""
    return NETWORKS.names()


def net_options():
    """Sorted tuple of every network option some registered network takes (``net_unit``, ``bn_mom``, ...)."""
    return tuple(sorted({key for name in NETWORKS.names() for key in NETWORKS.lookup(name).options}))


def __getattr__(name):
    if name == "NET_OPTIONS":  # former constant, now computed from the registry
        return net_options()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_embedding(network, emb_size=512, fc_type="E", **options):
    """Build the embedding network ``data`` (B, 3, H, W) RGB 0..255 -> ``fc1_output`` (B, emb_size).

    Parameters
    ----------
    network : str
        A name of :data:`NETWORKS` (see :func:`list_networks`).
    emb_size : int
        D.
    fc_type : str
        A name of :data:`FC_TYPES` (see :func:`symbols.heads.get_fc1`).
    **options
        Network options (:func:`net_options`); the ones this network does not take are ignored, so a whole
        config's options can be passed. Missing ones take the network preset (e.g. y2's ``net_blocks``) then
        the builder's defaults (configs/base.py's values).
    """
    entry = NETWORKS.lookup(network)
    if fc_type not in FC_TYPES:
        raise ValueError(f"{FC_TYPES.unknown_message(fc_type)} (network {network!r})")
    known = net_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"get_embedding({network!r}): unknown option(s) {unknown}; valid: {list(known)}")
    preset = {key: value for key, value in entry.preset.items() if key in entry.options}
    return entry.build(emb_size, fc_type, **{**preset, **options})


def get_symbol(config):
    """Build the grouped training symbol from a config dict / EasyDict (insightface HEAD ``get_symbol``).

    Keys missing from ``config`` come from the network preset (:data:`NETWORK_PRESETS`), then the loss
    preset (:data:`symbols.losses.HEAD_PRESETS`), then :data:`CONFIG_DEFAULTS` / the builders' defaults (equal
    to configs/base.py). Keys used: ``network``, ``emb_size``, ``net_output``, the network's options,
    ``num_classes``, ``loss``, ``loss_s``, ``loss_m1``, ``loss_m2``, ``loss_m3``, ``easy_margin``,
    ``fc7_no_bias``, ``fc7_lr_mult``, ``fc7_wd_mult``, ``ce_loss``, ``per_batch_size``, ``triplet_alpha``.

    Returns
    -------
    Symbol group, inputs ``data`` and ``softmax_label``:

    - softmax family: ``[BlockGrad(fc1), SoftmaxOutput(fc7, name='softmax', normalization='valid'),
      BlockGrad(ce_loss) if ce_loss]``; the margin-adjusted logits are the internal ``fc7_output``;
    - triplet family: ``[BlockGrad(fc1), BlockGrad(softmax_label), MakeLoss(loss)]``.

    ``fc7_weight`` (C, D) carries ``lr_mult``/``wd_mult`` from ``fc7_lr_mult``/``fc7_wd_mult`` and a
    ``Normal(0.01)`` init attribute; ``fc7_bias`` (softmax head) lr x2 / wd x0. As in insightface these
    attributes only take effect when the optimizer is built with ``sym=``/``param_idx2name`` (the engine's
    ``honour_param_mults``); insightface's own optimizer (HEAD train.py ``optimizer.SGD(...)`` without them)
    ignores them and decays every parameter. ``fc7_output`` is the logits SoftmaxOutput sees (margin applied);
    ``fc7_cos_output`` is s·cosθ.
    """
    network = config.get("network", CONFIG_DEFAULTS["network"])
    net_entry = NETWORKS.lookup(network)
    head_name = config.get("loss", net_entry.preset.get("loss", CONFIG_DEFAULTS["loss"]))
    head = HEADS.lookup(head_name)
    layers = (config, net_entry.preset, head.preset, CONFIG_DEFAULTS)

    def get(key):
        for layer in layers:
            if key in layer:
                return layer[key]
        raise KeyError(f"get_symbol: no value for config key {key!r}")

    options = {key: get(key) for key in net_entry.options if key in config or key in net_entry.preset}
    emb_size = int(get("emb_size"))
    embedding = get_embedding(network, emb_size=emb_size, fc_type=get("net_output"), **options)
    label = mx.sym.Variable("softmax_label")
    outputs = [mx.sym.BlockGrad(embedding)]
    if head.is_triplet:
        loss = head.triplet(embedding, int(get("per_batch_size")), float(get("triplet_alpha")))
        outputs += [mx.sym.BlockGrad(label), mx.sym.MakeLoss(loss)]
        return mx.sym.Group(outputs)
    margins = {key: get(key) for key in ("loss_s", "loss_m1", "loss_m2", "loss_m3")}
    _warn_if_margins_differ_from_preset(head, margins)
    num_classes = int(get("num_classes"))
    if num_classes <= 0:
        raise ValueError(f"get_symbol: num_classes={num_classes} must be > 0 (set it, or let the engine read "
                         "it from the dataset's property file)")
    logits = losses.head_logits(
        embedding, label, head_name, num_classes, emb_size, s=float(get("loss_s")), m1=float(get("loss_m1")),
        m2=float(get("loss_m2")), m3=float(get("loss_m3")), easy_margin=int(get("easy_margin")),
        fc7_no_bias=bool(get("fc7_no_bias")), fc7_lr_mult=float(get("fc7_lr_mult")),
        fc7_wd_mult=float(get("fc7_wd_mult")))
    outputs.append(mx.sym.SoftmaxOutput(data=logits, label=label, name="softmax", normalization="valid"))
    if get("ce_loss"):
        ce = losses.ce_loss(logits, label, num_classes, int(get("per_batch_size")))
        outputs.append(mx.sym.BlockGrad(ce, name="ce_loss"))
    return mx.sym.Group(outputs)


def _warn_if_margins_differ_from_preset(head, margins):
    """Log when a named head is built with margins other than its preset's (e.g. a tuned ArcFace s=32).

    recognition.config fills a named head's preset margins unless the user gives them, so a difference here
    is either deliberate or a config assembled by hand (e.g. loss='cosface' with base's loss_m2=0.5, which
    is a combined margin): say which margins are used, at INFO level.
    """
    if head.name == "softmax":
        return
    preset = head.preset
    differs = {k: v for k, v in margins.items() if k in preset and float(v) != float(preset[k])}
    if differs:
        logger.info("loss %r with %s (its preset has %s; see symbols.losses.HEAD_PRESETS[%r])",
                    head.name, differs, {k: preset[k] for k in differs}, head.name)


def get_initializer(network):
    """insightface's initialiser for ``network`` (its registered initializer family).

    fresnet and MobileFaceNet: ``Xavier(rnd_type='gaussian', factor_type='out', magnitude=2)`` (HEAD train.py and
    OLD train_softmax.py choose by family); other families ``Xavier('uniform', 'in', 2)`` unless registered
    otherwise. Variables with an ``__init__`` attribute (PReLU slopes 0.25, fc7_weight Normal(0.01)) keep it:
    ``mx.init.Initializer`` applies the attribute first.
    """
    entry = NETWORKS.lookup(network)
    return mx.init.Xavier(**INITIALIZER_FAMILIES[entry.initializer])
