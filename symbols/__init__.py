"""Network builders, embedding heads and loss heads faithful to insightface (spec §5, §6).

Public API
----------
- :func:`list_networks` -> sorted registry keys (``r18`` ... ``r269``, ``r100fc``, ``r50v1``, ``y1``, ``y2``).
- :func:`get_embedding` (network, emb_size=512, fc_type='E', **options) -> Symbol ``data`` -> ``fc1_output``.
- :func:`get_symbol` (config) -> grouped training Symbol (insightface's output order).
- :func:`get_initializer` (network) -> ``mx.init.Initializer`` (per-variable ``__init__`` attrs win).
- :mod:`symbols.losses`: heads, ``HEAD_PRESETS``, ``LEGACY_LOSS_TYPES``.
"""
import logging

import mxnet as mx

from . import fmobilefacenet, fresnet, losses
from .heads import FC_TYPES, get_fc1, list_fc_types

logger = logging.getLogger(__name__)

__all__ = ["NETWORKS", "NETWORK_PRESETS", "NET_OPTIONS", "get_embedding", "get_symbol", "get_initializer",
           "list_networks", "list_fc_types", "get_fc1", "losses", "FC_TYPES"]

# Registry: name -> (family, fixed builder kwargs). fresnet names are r<depth> for every depth of the
# insightface tables; HEAD also defines r100fc (FC head) and r50v1 (unit v1) through config presets.
NETWORKS = {f"r{depth}": ("fresnet", {"num_layers": depth}) for depth in fresnet.UNITS}
NETWORKS.update({
    "r100fc": ("fresnet", {"num_layers": 100}),
    "r50v1": ("fresnet", {"num_layers": 50}),
    "y1": ("fmobilefacenet", {}),
    "y2": ("fmobilefacenet", {}),
})

# Per-network config defaults (HEAD sample_config ``network.<name>``): they fill keys MISSING from the config
# given to get_symbol (HEAD lets the network preset override the generic defaults the same way).
NETWORK_PRESETS = {
    "r100fc": {"net_output": "FC"},
    "r50v1": {"net_unit": 1},
    "y1": {"emb_size": 128, "net_output": "GDC", "net_blocks": [1, 4, 6, 2]},
    "y2": {"emb_size": 256, "net_output": "GDC", "net_blocks": [2, 8, 16, 4]},
}

# Options get_embedding accepts (insightface's network config keys + ours); the ones a family does not
# use are ignored so that a whole config can be passed.
NET_OPTIONS = ("net_input", "net_unit", "net_se", "net_act", "bn_mom", "workspace", "net_blocks", "net_multiplier",
               "fast_prelu", "net_bottleneck_from")

_FAMILY_OPTIONS = {
    "fresnet": {"net_input": "net_input", "net_unit": "net_unit", "net_se": "net_se", "net_act": "net_act",
                "bn_mom": "bn_mom", "workspace": "workspace", "net_multiplier": "net_multiplier",
                "fast_prelu": "fast_prelu", "net_bottleneck_from": "bottleneck_from"},
    "fmobilefacenet": {"net_blocks": "net_blocks", "bn_mom": "bn_mom", "net_act": "net_act",
                       "fast_prelu": "fast_prelu", "workspace": "workspace"},
}
_BUILDERS = {"fresnet": fresnet.get_symbol, "fmobilefacenet": fmobilefacenet.get_symbol}
# Xavier(gaussian, out, 2) for the families insightface trains with it (spec §8.4).
_GAUSSIAN_OUT_FAMILIES = ("fresnet", "fmobilefacenet")


def list_networks():
    """Sorted list of registered network names."""
    return sorted(NETWORKS)


def _family(network):
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; valid networks: {list_networks()}")
    return NETWORKS[network]


def get_embedding(network, emb_size=512, fc_type="E", **options):
    """Build the embedding network ``data`` (B, 3, H, W) RGB 0..255 -> ``fc1_output`` (B, emb_size).

    Parameters
    ----------
    network : str
        Registry key (see :func:`list_networks`).
    emb_size : int
        D.
    fc_type : str
        Embedding head type (see :func:`symbols.heads.get_fc1`).
    **options
        Any of :data:`NET_OPTIONS`; options a family does not use are ignored. Missing ones take the
        network preset (e.g. y2's ``net_blocks``) then the builder defaults.
    """
    family, fixed = _family(network)
    if fc_type not in FC_TYPES:
        raise ValueError(f"unknown fc type {fc_type!r} for network {network!r}; valid types: {list_fc_types()}")
    unknown = sorted(set(options) - set(NET_OPTIONS))
    if unknown:
        raise ValueError(f"get_embedding({network!r}): unknown option(s) {unknown}; valid: {sorted(NET_OPTIONS)}")
    preset = {k: v for k, v in NETWORK_PRESETS.get(network, {}).items() if k in NET_OPTIONS}
    merged = {**preset, **options}
    kwargs = dict(fixed)
    for key, arg in _FAMILY_OPTIONS[family].items():
        if key in merged and merged[key] is not None:
            kwargs[arg] = merged[key]
    return _BUILDERS[family](emb_size=emb_size, fc_type=fc_type, **kwargs)


def _config_get(config, key, network, base):
    if key in config:
        return config[key]
    preset = NETWORK_PRESETS.get(network, {})
    if key in preset:
        return preset[key]
    head = losses.HEAD_PRESETS.get(config.get("loss", base.loss), {})
    if key in head:
        return head[key]
    return base[key]


def get_symbol(config):
    """Build the grouped training symbol from a config dict / EasyDict (insightface HEAD ``get_symbol``).

    Keys missing from ``config`` come from the network preset (:data:`NETWORK_PRESETS`), then the loss
    preset (:data:`symbols.losses.HEAD_PRESETS`), then ``configs.base.config``. Keys used: ``network``,
    ``emb_size``, ``net_output``, the network options, ``num_classes``, ``loss``, ``loss_s``, ``loss_m1``,
    ``loss_m2``, ``loss_m3``, ``easy_margin``, ``fc7_no_bias``, ``fc7_lr_mult``, ``fc7_wd_mult``,
    ``ce_loss``, ``per_batch_size``, ``triplet_alpha``.

    Returns
    -------
    Symbol group, inputs ``data`` and ``softmax_label``:

    - softmax family: ``[BlockGrad(fc1), SoftmaxOutput(fc7, name='softmax', normalization='valid'),
      BlockGrad(ce_loss) if ce_loss]``; the margin-adjusted logits are the internal ``fc7_output``;
    - triplet/atriplet: ``[BlockGrad(fc1), BlockGrad(softmax_label), MakeLoss(loss)]``.

    ``fc7_weight`` (C, D) carries ``lr_mult``/``wd_mult`` from ``fc7_lr_mult``/``fc7_wd_mult`` and a
    ``Normal(0.01)`` init attribute; ``fc7_bias`` (softmax head) lr x2 / wd x0. As in insightface these
    attributes only take effect when the optimizer is built with ``sym=``/``param_idx2name`` (the engine's
    ``honour_param_mults``); insightface's own optimizer ignores them and decays every parameter (spec §8.5).
    ``fc7_output`` is the logits SoftmaxOutput sees (margin applied); ``fc7_cos_output`` is s·cosθ.
    """
    from configs.base import config as base

    def get(key):
        return _config_get(config, key, network, base)

    network = config.get("network", base.network)
    head = get("loss")
    losses.check_head(head)
    options = {key: get(key) for key in NET_OPTIONS if key in config or key in base
               or key in NETWORK_PRESETS.get(network, {})}
    emb_size = int(get("emb_size"))
    embedding = get_embedding(network, emb_size=emb_size, fc_type=get("net_output"), **options)
    label = mx.sym.Variable("softmax_label")
    outputs = [mx.sym.BlockGrad(embedding)]
    if head in losses.TRIPLET_HEADS:
        per_batch_size = int(get("per_batch_size"))
        loss = losses.triplet_loss(embedding, per_batch_size, float(get("triplet_alpha")),
                                   angular=head == "atriplet")
        outputs += [mx.sym.BlockGrad(label), mx.sym.MakeLoss(loss)]
        return mx.sym.Group(outputs)
    margins = {key: get(key) for key in ("loss_s", "loss_m1", "loss_m2", "loss_m3")}
    _warn_if_margins_differ_from_preset(head, margins)
    num_classes = int(get("num_classes"))
    if num_classes <= 0:
        raise ValueError(f"get_symbol: num_classes={num_classes} must be > 0 (set it, or let the engine read "
                         "it from the dataset's property file)")
    logits = losses.head_logits(
        embedding, label, head, num_classes, emb_size, s=float(get("loss_s")), m1=float(get("loss_m1")),
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
    preset = losses.HEAD_PRESETS[head]
    if head == "softmax":
        return
    differs = {k: v for k, v in margins.items() if float(v) != float(preset[k])}
    if differs:
        logger.info("loss %r with %s (its preset has %s; see symbols.losses.HEAD_PRESETS[%r])",
                    head, differs, {k: preset[k] for k in differs}, head)


def get_initializer(network):
    """insightface's initialiser for ``network`` (spec §8.4).

    fresnet and MobileFaceNet: ``Xavier(rnd_type='gaussian', factor_type='out', magnitude=2)``; other families
    ``Xavier('uniform', 'in', 2)``. Variables with an ``__init__`` attribute (PReLU slopes 0.25, fc7_weight
    Normal(0.01)) keep it: ``mx.init.Initializer`` applies the attribute first.
    """
    family, _ = _family(network)
    if family in _GAUSSIAN_OUT_FAMILIES:
        return mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2)
    return mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=2)
