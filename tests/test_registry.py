"""Registries: the generic Registry, one-decorator extension, config <-> registry agreement, defaults, layering."""
import ast
import inspect
import math
import os
import subprocess
import sys

import mxnet as mx
import pytest

import symbols
from recognition.config import ConfigError, build_arg_parser, load_config, parse_args, valid_names
from symbols import losses
from symbols.common import conv, normalize_input
from symbols.heads import get_fc1
from symbols.registry import (FC_TYPES, HEADS, NETWORKS, Registry, UnknownNameError, register_fc_type,
                              register_head, register_network)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = (2, 3, 112, 112)
SMALL = {"net_multiplier": 0.125, "emb_size": 8, "num_classes": 4, "per_batch_size": 6}


# ----------------------------------------------------------------------------- the generic Registry
def test_registry_register_lookup_and_errors():
    reg = Registry("widget", "widgets")

    @reg.register("alpha")
    @reg.register("beta")
    def build():
        return 1

    assert build() == 1  # the decorator returns the builder unchanged
    assert reg.names() == ["alpha", "beta"] and list(reg) == ["alpha", "beta"] and len(reg) == 2
    assert "alpha" in reg and "gamma" not in reg
    assert reg.lookup("alpha") is build and reg["beta"] is build
    assert reg.get("gamma") is None  # Mapping.get
    with pytest.raises(UnknownNameError, match=r"unknown widget 'alpah'; valid widgets: \['alpha', 'beta'\]; "
                                               r"did you mean 'alpha'\?"):
        reg.lookup("alpah")
    with pytest.raises(ValueError, match="valid widgets"):
        reg["zzz"]
    with pytest.raises(KeyError):
        reg["zzz"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(build)
    reg.register("alpha", override=True)(len)
    assert reg.lookup("alpha") is len
    reg.unregister("alpha")
    assert reg.names() == ["beta"]
    with pytest.raises(UnknownNameError):
        reg.unregister("alpha")


def test_public_names_are_views_of_the_registries():
    assert symbols.list_networks() == NETWORKS.names()
    assert symbols.list_fc_types() == FC_TYPES.names()
    assert losses.list_heads() == HEADS.names()
    assert dict(symbols.NETWORK_PRESETS) == {name: NETWORKS.lookup(name).preset for name in NETWORKS.names()}
    assert dict(losses.HEAD_PRESETS) == {name: HEADS.lookup(name).preset for name in HEADS.names()}
    assert set(losses.TRIPLET_HEADS) == {"triplet", "atriplet"}
    assert set(losses.SOFTMAX_HEADS) | set(losses.TRIPLET_HEADS) == set(HEADS)
    assert "net_unit" in symbols.NET_OPTIONS and "net_blocks" in symbols.NET_OPTIONS
    assert NETWORKS.lookup("r50").options == ("net_input", "net_unit", "net_se", "net_act", "bn_mom", "workspace",
                                              "net_multiplier", "fast_prelu", "net_bottleneck_from")
    assert set(NETWORKS.lookup("y1").options) == {"net_blocks", "bn_mom", "net_act", "fast_prelu", "workspace"}


# ----------------------------------------------------------------------------- config <-> registries
@pytest.mark.parametrize("key, registry", [("network", NETWORKS), ("loss", HEADS), ("net_output", FC_TYPES)])
def test_config_accepts_exactly_the_registered_names(key, registry):
    assert valid_names(key) == registry.names()
    for name in registry.names():
        assert load_config(overrides={key: name, "per_batch_size": 6})[key] == name
    with pytest.raises(ConfigError, match=f"'{key}'.*must be one of"):
        load_config(overrides={key: "no_such_name"})


def _infer(cfg, batch=6):
    sym = symbols.get_symbol(cfg)
    _, out_shapes, _ = sym.infer_shape(data=(batch, 3, 112, 112), softmax_label=(batch,))
    return sym, out_shapes


@pytest.mark.parametrize("network", valid_names("network"))
def test_every_accepted_network_builds(network):
    _, out_shapes = _infer(load_config(overrides={**SMALL, "network": network}))
    assert out_shapes[0] == (6, 8)


@pytest.mark.parametrize("net_output", valid_names("net_output"))
def test_every_accepted_fc_type_builds(net_output):
    cfg = load_config(overrides={**SMALL, "network": "r18", "net_output": net_output, "loss": "triplet"})
    _, out_shapes = _infer(cfg)
    assert out_shapes[0] == ((6, 64, 7, 7) if net_output == "Z" else (6, 8))  # r18 x 0.125: 64 channels


@pytest.mark.parametrize("loss", valid_names("loss"))
def test_every_accepted_loss_builds(loss):
    sym, out_shapes = _infer(load_config(overrides={**SMALL, "network": "r18", "loss": loss}))
    if HEADS.lookup(loss).is_triplet:
        assert out_shapes == [(6, 8), (6,), (1,)]
    else:
        assert out_shapes == [(6, 8), (6, 4), (1,)]
        assert "fc7_output" in sym.get_internals().list_outputs()


def test_help_lists_the_registered_names():
    text = build_arg_parser().format_help().replace("\n", " ")
    for name in ("r100fc", "y2", "GNAP", "arcface_v1", "atriplet"):
        assert f" {name} " in f" {' '.join(text.split())} "


# ----------------------------------------------------------------------------- one decorator extends everything
@pytest.fixture
def toy_names():
    """Unregister whatever the test registers (NETWORKS / FC_TYPES / HEADS), even when it fails."""
    added = []
    yield added
    for registry, name in added:
        if name in registry:
            registry.unregister(name)


def test_toy_backbone_one_decorator(toy_names):
    @register_network("toy_net", preset={"emb_size": 16, "net_output": "GAP"}, initializer="gaussian_out")
    def toy_net(emb_size=512, fc_type="E", net_act="prelu", bn_mom=0.9, fast_prelu=True):
        body = conv(normalize_input(mx.sym.Variable("data")), 8, (3, 3), (16, 16), (1, 1), name="toy_conv0")
        return get_fc1(body, emb_size, fc_type, in_channels=8, bn_mom=bn_mom, act_type=net_act,
                       fast_prelu=fast_prelu)
    toy_names.append((NETWORKS, "toy_net"))

    assert NETWORKS.lookup("toy_net").options == ("net_act", "bn_mom", "fast_prelu")
    # through the config: accepted, its preset fills emb_size / net_output, unused options are ignored
    cfg = parse_args(["--network", "toy_net", "--num-classes", "3", "--per-batch-size", "2"])
    assert (cfg.emb_size, cfg.net_output) == (16, "GAP")
    sym, out_shapes = _infer(cfg, batch=2)
    assert out_shapes == [(2, 16), (2, 3), (1,)]
    assert "toy_conv0_weight" in sym.list_arguments() and "relu1_gamma" in sym.list_arguments()
    # directly, with a dict missing most keys
    _, out_shapes = _infer({"network": "toy_net", "num_classes": 3, "per_batch_size": 2, "net_act": "relu"}, 2)
    assert out_shapes[0] == (2, 16)
    assert "--network" in build_arg_parser().format_help() and "toy_net" in build_arg_parser().format_help()
    assert isinstance(symbols.get_initializer("toy_net"), mx.init.Xavier)

    NETWORKS.unregister("toy_net")
    with pytest.raises(ConfigError, match="'network'.*must be one of"):
        load_config(overrides={"network": "toy_net"})


def test_toy_loss_head_one_decorator(toy_names):
    @register_head("toy_cos", preset={"loss_s": 10.0, "loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": 0.25})
    def toy_cos(embedding, label, num_classes, weight, s, m3, dtype="float32", **_):
        # an additive cosine margin only, whatever loss_m1/loss_m2 say
        return losses.margin_softmax_logits(embedding, label, num_classes, weight, s=s, m1=1.0, m2=0.0, m3=m3,
                                            dtype=dtype)
    toy_names.append((HEADS, "toy_cos"))

    assert losses.HEAD_PRESETS["toy_cos"]["loss_m3"] == 0.25 and "toy_cos" in losses.list_heads()
    cfg = load_config(overrides={**SMALL, "network": "r18", "loss": "toy_cos"})
    assert (cfg.loss_s, cfg.loss_m2, cfg.loss_m3) == (10.0, 0.0, 0.25)  # the preset filled the margins
    sym, out_shapes = _infer(cfg)
    assert out_shapes == [(6, 8), (6, 4), (1,)]
    # the logits are the toy formula: s * (cos - m3) on the target, s * cos elsewhere
    logits = losses.head_logits(mx.sym.Variable("data"), mx.sym.Variable("softmax_label"), "toy_cos", 2, 2, s=10.0,
                                m3=0.25)
    ex = logits.bind(mx.cpu(), {"data": mx.nd.array([[1.0, 0.0]]), "fc7_weight": mx.nd.array([[1.0, 0.0], [0, 1]]),
                                "softmax_label": mx.nd.array([0])})
    assert ex.forward()[0].asnumpy().tolist() == [[pytest.approx(7.5), pytest.approx(0.0)]]


def test_toy_triplet_head_and_fc_type_one_decorator(toy_names):
    @register_head("toy_triplet", preset={"triplet_alpha": 0.1}, triplet=True)
    def toy_triplet(embedding, per_batch_size, alpha):
        return losses.triplet_loss(embedding, per_batch_size, alpha)
    toy_names.append((HEADS, "toy_triplet"))

    @register_fc_type("TOY")
    def fc_toy(body, emb_size, **_):
        pooled = mx.sym.Pooling(data=body, global_pool=True, kernel=(7, 7), pool_type="max")
        return mx.sym.FullyConnected(data=pooled, num_hidden=emb_size, name="fc1")
    toy_names.append((FC_TYPES, "TOY"))

    cfg = load_config(overrides={**SMALL, "network": "r18", "loss": "toy_triplet", "net_output": "TOY"})
    assert cfg.triplet_alpha == 0.1
    sym, out_shapes = _infer(cfg)
    assert out_shapes == [(6, 8), (6,), (1,)]
    assert "fc1_weight" in sym.list_arguments() and "bn1_gamma" not in sym.list_arguments()
    with pytest.raises(ConfigError, match="divisible by 3"):  # a registered triplet head gets the batch check
        load_config(overrides={"loss": "toy_triplet", "per_batch_size": 64})


# ----------------------------------------------------------------------------- defaults equal configs/base.py
def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b))
    return a == b and type(a) is type(b)


def test_symbols_defaults_equal_configs_base():
    from configs.base import config as base
    for key, value in symbols.CONFIG_DEFAULTS.items():
        assert key in base and _same(value, base[key]), (key, value, base.get(key))
    checked = set()
    for name in NETWORKS.names():
        entry = NETWORKS.lookup(name)
        params = inspect.signature(entry.builder).parameters
        assert _same(params["emb_size"].default, base.emb_size) and params["fc_type"].default == base.net_output
        for key, value in entry.defaults().items():
            if key in base:
                assert _same(value, base[key]), (name, key, value, base[key])
                checked.add(key)
    assert {"net_input", "net_unit", "net_se", "net_act", "net_blocks", "net_multiplier", "bn_mom", "workspace",
            "fast_prelu"} <= checked
    fc1 = inspect.signature(get_fc1).parameters
    assert fc1["fc_type"].default == base.net_output and fc1["bn_mom"].default == base.bn_mom
    assert fc1["act_type"].default == base.net_act and fc1["fast_prelu"].default == base.fast_prelu
    assert fc1["workspace"].default == base.workspace
    head = inspect.signature(losses.head_logits).parameters
    for arg, key in (("s", "loss_s"), ("m1", "loss_m1"), ("m2", "loss_m2"), ("m3", "loss_m3"),
                     ("easy_margin", "easy_margin"), ("fc7_no_bias", "fc7_no_bias"), ("fc7_lr_mult", "fc7_lr_mult"),
                     ("fc7_wd_mult", "fc7_wd_mult")):
        assert _same(head[arg].default, base[key]), (arg, key)


def test_network_options_are_config_keys():
    """Every option a registered network takes is a configs/base.py key, except the documented extra."""
    from configs.base import config as base
    not_in_base = {key for key in symbols.NET_OPTIONS if key not in base}
    assert not_in_base == {"net_bottleneck_from"}  # fresnet's OLD/HEAD bottleneck threshold (get_embedding only)


def test_get_symbol_without_keys_equals_get_symbol_with_base():
    from configs.base import config as base
    small = {"network": "r18", "num_classes": 4, "net_multiplier": 0.125}
    with mx.name.NameManager():  # same auto-generated operator names in both graphs
        bare = symbols.get_symbol(small)
    with mx.name.NameManager():
        full = symbols.get_symbol({**base, **small})
    assert bare.tojson() == full.tojson()


# ----------------------------------------------------------------------------- layering
def test_symbols_imports_neither_configs_nor_recognition():
    files = [os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(ROOT, "symbols"))
             for name in names if name.endswith(".py")]
    assert len(files) >= 6
    for file in sorted(files):
        with open(file, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("configs", "recognition"), (file, name)
    code = ("import sys, symbols; symbols.get_symbol({'network': 'r18', 'num_classes': 2, 'net_multiplier': 0.125}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('configs', 'recognition')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
