"""Registries: the single source of truth for network, embedding-head (fc type) and loss-head names.

Contract
--------
A :class:`Registry` maps a name to an entry. ``register(name, ...)`` is a decorator that records the
decorated builder and returns it unchanged (so decorators stack to give one builder several names);
``names()`` is the sorted list of names; ``lookup(name)`` (and ``registry[name]``) returns the entry or raises
:class:`UnknownNameError` (a ``ValueError`` and ``KeyError``) that lists every valid name and suggests the
closest one; ``registry.get(name)`` is the ``Mapping`` one (None when unknown). Registering a
name twice raises unless ``override=True``; ``unregister(name)`` removes a name (tests register toys).
A registry is a read-only ``Mapping`` (``name in NETWORKS``, ``for name in HEADS``, ``FC_TYPES[name]``).

The three registries of this package, and what an entry holds:

* :data:`NETWORKS` (:func:`register_network`): :class:`NetworkEntry` - the builder
  ``builder(emb_size, fc_type, **options) -> Symbol`` ending in ``fc1``, the network preset (config keys the
  name implies, insightface HEAD ``sample_config.network.<name>``), the options the builder takes (config keys
  such as ``net_unit``, ``bn_mom``; by default every keyword parameter of the builder except ``emb_size`` and
  ``fc_type``), fixed keyword arguments and the initializer family.
* :data:`FC_TYPES` (:func:`register_fc_type`): :class:`FcTypeEntry` - the embedding head
  ``builder(body, emb_size, in_channels, bn_mom, act_type, fast_prelu, workspace) -> Symbol named fc1``.
* :data:`HEADS` (:func:`register_head`): :class:`HeadEntry` - either a classifier-logits builder
  ``logits(embedding, label, num_classes, weight, s, m1, m2, m3, easy_margin, fc7_no_bias, dtype)`` (softmax
  family; it must accept and may ignore every keyword) or a triplet-loss builder
  ``triplet(embedding, per_batch_size, alpha)``, plus the head's preset (``loss_s``, ``loss_m*``,
  ``triplet_alpha``).

Adding a backbone or a head is one decorated function in one file::

    from symbols.registry import register_head

    @register_head("toy_cosface", preset={"loss_s": 30.0, "loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": 0.2})
    def toy_cosface(embedding, label, num_classes, weight, s, m3, dtype="float32", **_):
        return margin_softmax_logits(embedding, label, num_classes, weight, s=s, m1=1.0, m2=0.0, m3=m3, dtype=dtype)

Once the module defining it is imported, ``--loss toy_cosface`` is accepted by ``recognition.config`` and
built by ``symbols.get_symbol``.
"""
import dataclasses
import difflib
import inspect
from collections.abc import Mapping

__all__ = ["Registry", "UnknownNameError", "NetworkEntry", "FcTypeEntry", "HeadEntry", "NETWORKS", "FC_TYPES",
           "HEADS", "INITIALIZER_FAMILIES", "register_network", "register_fc_type", "register_head"]


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered; the message lists the valid names and the closest one."""

    def __str__(self):
        return self.args[0] if self.args else ""


class Registry(Mapping):
    """name -> entry, filled by :meth:`register`; see the module docstring for the contract.

    Parameters
    ----------
    kind : str
        What a name denotes, used in messages ("network", "fc type", "loss head").
    plural : str
        Label of the list of valid names in messages ("networks", "types", "heads").
    make_entry : callable or None
        ``make_entry(name, builder, **fields) -> entry`` used by :meth:`register`; None stores the builder.
    """

    def __init__(self, kind, plural, make_entry=None):
        self.kind = kind
        self.plural = plural
        self._make_entry = make_entry
        self._entries = {}

    # -- Mapping
    def __getitem__(self, name):
        return self.lookup(name)

    def __iter__(self):
        return iter(self.names())

    def __len__(self):
        return len(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __repr__(self):
        return f"Registry({self.kind!r}, {self.names()})"

    # -- registration
    def add(self, name, entry, override=False):
        """Record ``entry`` under ``name``; a name already registered raises unless ``override``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: name must be a non-empty string, got {name!r}")
        if name in self._entries and not override:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass override=True to replace it "
                             f"or unregister it first")
        self._entries[name] = entry
        return entry

    def register(self, name, override=False, **fields):
        """Decorator: register the decorated builder as ``name`` (with ``fields`` for the entry)."""
        def decorator(builder):
            entry = self._make_entry(name, builder, **fields) if self._make_entry else builder
            self.add(name, entry, override=override)
            return builder
        return decorator

    def unregister(self, name):
        """Remove ``name`` (raises :class:`UnknownNameError` if it is not registered); returns its entry."""
        self.lookup(name)
        return self._entries.pop(name)

    # -- lookup
    def names(self):
        """Sorted list of registered names."""
        return sorted(self._entries)

    def suggest(self, name):
        """The registered name closest to ``name``, or None."""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1, cutoff=0.5)
        return close[0] if close else None

    def unknown_message(self, name):
        """``"unknown <kind> 'x'; valid <plural>: [...]; did you mean 'y'?"``."""
        close = self.suggest(name)
        hint = f"; did you mean {close!r}?" if close else ""
        return f"unknown {self.kind} {name!r}; valid {self.plural}: {self.names()}{hint}"

    def lookup(self, name):
        """Entry of ``name``; an unknown name raises :class:`UnknownNameError` listing the valid names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None


class PresetsView(Mapping):
    """Read-only live view ``name -> entry.preset`` of a registry (``HEAD_PRESETS``, ``NETWORK_PRESETS``)."""

    def __init__(self, registry):
        self._registry = registry

    def __getitem__(self, name):
        if name not in self._registry:
            raise KeyError(name)
        return self._registry.lookup(name).preset

    def __iter__(self):
        return iter(self._registry.names())

    def __len__(self):
        return len(self._registry)

    def __repr__(self):
        return repr(dict(self))


# ----------------------------------------------------------------------------- networks
# Initializer families (insightface OLD src/train_softmax.py and HEAD recognition/arcface_mxnet/train.py pick the
# initializer by network family): mx.init.Xavier arguments.
INITIALIZER_FAMILIES = {
    "gaussian_out": {"rnd_type": "gaussian", "factor_type": "out", "magnitude": 2},  # fresnet, fmobilefacenet
    "gaussian_in": {"rnd_type": "gaussian", "factor_type": "in", "magnitude": 2},    # inception, xception
    "uniform_in": {"rnd_type": "uniform", "factor_type": "in", "magnitude": 2},      # every other family
}
# Builder parameters that are not network options (get_embedding passes them explicitly).
_EMBEDDING_ARGS = ("emb_size", "fc_type")


@dataclasses.dataclass(frozen=True)
class NetworkEntry:
    """A registered backbone (see :func:`register_network`)."""

    name: str
    builder: object
    preset: dict
    options: tuple
    fixed: dict
    initializer: str

    def defaults(self):
        """Default value of each option, read from the builder's signature."""
        params = inspect.signature(self.builder).parameters
        return {key: params[key].default for key in self.options
                if key in params and params[key].default is not inspect.Parameter.empty}

    def build(self, emb_size, fc_type, **options):
        """Call the builder with the fixed kwargs and the options it takes (the others are ignored)."""
        kwargs = {key: value for key, value in options.items() if key in self.options and value is not None}
        return self.builder(emb_size=emb_size, fc_type=fc_type, **self.fixed, **kwargs)


def _builder_options(builder, fixed):
    params = inspect.signature(builder).parameters.values()
    return tuple(p.name for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not inspect.Parameter.empty
                 and p.name not in _EMBEDDING_ARGS and p.name not in fixed)


def _make_network(name, builder, preset=None, options=None, fixed=None, initializer="uniform_in"):
    fixed = dict(fixed or {})
    if initializer not in INITIALIZER_FAMILIES:
        raise ValueError(f"network {name!r}: initializer {initializer!r} is not one of "
                         f"{sorted(INITIALIZER_FAMILIES)}")
    options = tuple(options) if options is not None else _builder_options(builder, fixed)
    return NetworkEntry(name, builder, dict(preset or {}), options, fixed, initializer)


NETWORKS = Registry("network", "networks", _make_network)


def register_network(name, preset=None, options=None, fixed=None, initializer="uniform_in", override=False):
    """Decorator registering a backbone ``builder(emb_size=512, fc_type='E', **options) -> fc1 Symbol``.

    Parameters
    ----------
    name : str
        Registry key (``--network``).
    preset : dict or None
        Config keys the name implies (filled when the config does not set them), e.g. ``{'emb_size': 128}``.
    options : sequence of str or None
        Config keys the builder takes as keyword arguments; default: its keyword parameters with defaults
        (their defaults must equal configs/base.py's values; tests/test_registry.py checks).
    fixed : dict or None
        Keyword arguments always passed (e.g. ``{'num_layers': 50}``), not options.
    initializer : str
        Key of :data:`INITIALIZER_FAMILIES`.
    """
    return NETWORKS.register(name, override=override, preset=preset, options=options, fixed=fixed,
                             initializer=initializer)


# ----------------------------------------------------------------------------- embedding heads
@dataclasses.dataclass(frozen=True)
class FcTypeEntry:
    """A registered embedding head type (see :func:`register_fc_type`)."""

    name: str
    builder: object


FC_TYPES = Registry("fc type", "types", lambda name, builder: FcTypeEntry(name, builder))


def register_fc_type(name, override=False):
    """Decorator registering ``builder(body, emb_size, in_channels, bn_mom, act_type, fast_prelu, workspace)``."""
    return FC_TYPES.register(name, override=override)


# ----------------------------------------------------------------------------- loss heads
@dataclasses.dataclass(frozen=True)
class HeadEntry:
    """A registered loss head: exactly one of ``logits`` (softmax family) and ``triplet`` is set."""

    name: str
    preset: dict
    logits: object = None
    triplet: object = None

    @property
    def is_triplet(self):
        return self.triplet is not None


def _make_head(name, builder, preset=None, triplet=False):
    preset = dict(preset or {})
    if triplet:
        return HeadEntry(name, preset, triplet=builder)
    return HeadEntry(name, preset, logits=builder)


HEADS = Registry("loss head", "heads", _make_head)


def register_head(name, preset=None, triplet=False, override=False):
    """Decorator registering a loss head.

    Softmax family (``triplet=False``): ``logits(embedding, label, num_classes, weight, s, m1, m2, m3,
    easy_margin, fc7_no_bias, dtype) -> (B, C) Symbol named fc7`` (take ``**_`` for the unused keywords).
    Triplet family: ``triplet(embedding, per_batch_size, alpha) -> (1,) loss``. ``preset``: config keys the
    head implies (``loss_s``, ``loss_m1..3``, ``easy_margin``, ``triplet_alpha``).
    """
    return HEADS.register(name, override=override, preset=preset, triplet=triplet)
