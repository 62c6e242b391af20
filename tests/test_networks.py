"""Backbones and embedding heads: registry, shapes, insightface parameter names/shapes, initialiser."""
import json
import re

import mxnet as mx
import numpy as np
import pytest

import symbols

DATA = (2, 3, 112, 112)


def arg_aux_shapes(sym, data_shape=DATA):
    arg_shapes, out_shapes, aux_shapes = sym.infer_shape(data=data_shape)
    args = dict(zip(sym.list_arguments(), arg_shapes))
    args.pop("data")
    return args, dict(zip(sym.list_auxiliary_states(), aux_shapes)), out_shapes


# ----------------------------------------------------------------------------- expected tables from upstream
class Table:
    """Expected insightface argument/aux names and shapes, written from insightface's fresnet/fmobilefacenet/
    symbol_utils.get_fc1 (HEAD 7fadd420 recognition/arcface_mxnet/symbol/), not from the builders."""

    def __init__(self):
        self.args, self.aux = {}, {}

    def bn(self, name, c):
        self.args[f"{name}_gamma"] = (c,)
        self.args[f"{name}_beta"] = (c,)
        self.aux[f"{name}_moving_mean"] = (c,)
        self.aux[f"{name}_moving_var"] = (c,)

    def conv(self, name, cout, cin, k):
        self.args[f"{name}_weight"] = (cout, cin, k, k)

    def prelu(self, name, c):
        self.args[f"{name}_gamma"] = (c,)

    def head_e(self, cin, emb):
        self.bn("bn1", cin)
        self.args["pre_fc1_weight"] = (emb, cin * 7 * 7)
        self.args["pre_fc1_bias"] = (emb,)
        self.bn("fc1", emb)


def fresnet_table(units, filters, emb):
    """LResNet-E-IR (net_input 1, unit v3 basic, head E)."""
    t = Table()
    t.conv("conv0", filters[0], 3, 3)
    t.bn("bn0", filters[0])
    t.prelu("relu0", filters[0])
    cin = filters[0]
    for i, n in enumerate(units):
        f = filters[i + 1]
        for j in range(n):
            u = f"stage{i + 1}_unit{j + 1}"
            t.bn(f"{u}_bn1", cin)
            t.conv(f"{u}_conv1", f, cin, 3)
            t.bn(f"{u}_bn2", f)
            t.prelu(f"{u}_relu1", f)
            t.conv(f"{u}_conv2", f, f, 3)
            t.bn(f"{u}_bn3", f)
            if j == 0:
                t.conv(f"{u}_conv1sc", f, cin, 1)
                t.bn(f"{u}_sc", f)
            cin = f
    t.head_e(cin, emb)
    return t


def mobilefacenet_table(blocks, emb):
    """MobileFaceNet (HEAD recognition/arcface_mxnet/symbol/fmobilefacenet.py::get_symbol) with the GDC head."""
    t = Table()

    def conv_block(name, cout, cin_per_group, k, act=True):
        t.conv(f"{name}_conv2d", cout, cin_per_group, k)
        t.bn(f"{name}_batchnorm", cout)
        if act:
            t.prelu(f"{name}_relu", cout)

    def dresidual(name, cin, cout, groups):
        conv_block(f"{name}_conv_sep", groups, cin, 1)
        conv_block(f"{name}_conv_dw", groups, 1, 3)
        conv_block(f"{name}_conv_proj", cout, groups, 1, act=False)

    def residual(name, n, c, groups):
        for i in range(n):
            dresidual(f"{name}_block{i}", c, c, groups)

    conv_block("conv_1", 64, 3, 3)
    if blocks[0] == 1:
        conv_block("conv_2_dw", 64, 1, 3)
    else:
        residual("res_2", blocks[0], 64, 64)
    dresidual("dconv_23", 64, 64, 128)
    residual("res_3", blocks[1], 64, 128)
    dresidual("dconv_34", 64, 128, 256)
    residual("res_4", blocks[2], 128, 256)
    dresidual("dconv_45", 128, 128, 512)
    residual("res_5", blocks[3], 128, 256)
    conv_block("conv_6sep", 512, 128, 1)
    conv_block("conv_6dw7_7", 512, 1, 7, act=False)
    t.args["pre_fc1_weight"] = (emb, 512)
    t.args["pre_fc1_bias"] = (emb,)
    t.bn("fc1", emb)
    return t


UNITS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3],
         "r152": [3, 8, 36, 3]}


@pytest.mark.parametrize("network", sorted(UNITS))
@pytest.mark.parametrize("fast_prelu", [True, False])
def test_fresnet_names_and_shapes(network, fast_prelu):
    sym = symbols.get_embedding(network, emb_size=512, fc_type="E", fast_prelu=fast_prelu)
    args, aux, out = arg_aux_shapes(sym)
    expected = fresnet_table(UNITS[network], [64, 64, 128, 256, 512], 512)
    assert args == expected.args
    assert aux == expected.aux
    assert out == [(2, 512)]


def test_r50_counts_and_samples():
    args, aux, _ = arg_aux_shapes(symbols.get_embedding("r50", emb_size=512))
    # 24 units: 2 convs + 3 BN + 1 PReLU each, 4 projection shortcuts (conv + BN), stem, head.
    n_bn = 24 * 3 + 4 + 1 + 2
    assert len(aux) == 2 * n_bn
    assert len(args) == 24 * 2 + 4 + 1 + 2 * n_bn + 25 + 2  # convs, bn gamma/beta, prelus, pre_fc1 w/b
    assert args["pre_fc1_weight"] == (512, 25088)
    assert args["stage3_unit14_conv2_weight"] == (256, 256, 3, 3)
    assert args["stage2_unit1_conv1sc_weight"] == (128, 64, 1, 1)
    assert args["stage4_unit3_relu1_gamma"] == (512,)
    assert aux["fc1_moving_var"] == (512,)


@pytest.mark.parametrize("network,blocks,emb", [("y1", [1, 4, 6, 2], 128), ("y2", [2, 8, 16, 4], 256)])
def test_mobilefacenet_names_and_shapes(network, blocks, emb):
    sym = symbols.get_symbol({"network": network, "num_classes": 10, "per_batch_size": 2, "ce_loss": False})
    fc1 = sym.get_internals()["fc1_output"]
    args, aux, out = arg_aux_shapes(fc1)
    expected = mobilefacenet_table(blocks, emb)
    assert args == expected.args
    assert aux == expected.aux
    assert out == [(2, emb)]


def test_net_multiplier_quarter_width():
    args, _, out = arg_aux_shapes(symbols.get_embedding("r18", emb_size=128, net_multiplier=0.25))
    expected = fresnet_table(UNITS["r18"], [16, 16, 32, 64, 128], 128)
    assert args == expected.args
    assert args["pre_fc1_weight"] == (128, 128 * 49)
    assert out == [(2, 128)]


@pytest.mark.parametrize("network", symbols.list_networks())
def test_every_network_infers_embedding_shape(network):
    sym = symbols.get_embedding(network, emb_size=64)
    assert sym.list_outputs() == ["fc1_output"]
    _, out_shapes, _ = sym.infer_shape(data=DATA)
    assert out_shapes == [(2, 64)]


def test_list_networks_and_unknown_names():
    names = symbols.list_networks()
    assert names == sorted(names)
    assert {"r18", "r34", "r50", "r100", "r152", "y1", "y2"} <= set(names)
    with pytest.raises(ValueError, match=r"valid networks: \[.*'r100'.*'y1'"):
        symbols.get_embedding("r17")
    with pytest.raises(ValueError, match=r"valid types: \[.*'E'.*'GDC'"):
        symbols.get_embedding("r18", fc_type="Q")
    with pytest.raises(ValueError, match="unknown option"):
        symbols.get_embedding("r18", net_multipler=0.5)
    with pytest.raises(ValueError, match="valid networks"):
        symbols.get_initializer("resnet50")


@pytest.mark.parametrize("fc_type", symbols.list_fc_types())
def test_every_fc_type(fc_type):
    sym = symbols.get_embedding("r18", emb_size=32, fc_type=fc_type, net_multiplier=0.25)
    args, _, out = arg_aux_shapes(sym)
    assert sym.list_outputs() == ["fc1_output"]
    expect = (2, 128, 7, 7) if fc_type == "Z" else (2, 32)
    assert out == [expect]
    has = {
        "E": ["bn1_gamma", "pre_fc1_weight", "fc1_gamma"], "I": ["bn1_gamma", "pre_fc1_weight", "fc1_gamma"],
        "FC": ["bn1_gamma", "pre_fc1_weight", "fc1_gamma"], "J": ["pre_fc1_weight", "fc1_gamma"],
        "F": ["bn1_gamma", "fc1_weight", "fc1_bias"], "G": ["bn1_gamma", "fc1_weight"], "H": ["fc1_weight"],
        "Z": ["bn1_gamma"], "GAP": ["bn1_gamma", "relu1_gamma", "pre_fc1_weight", "fc1_gamma"],
        "GDC": ["conv_6dw7_7_conv2d_weight", "conv_6dw7_7_batchnorm_gamma", "pre_fc1_weight", "fc1_gamma"],
        "GNAP": ["bn6f_gamma", "bn6w_gamma", "pre_fc1_weight", "fc1_gamma"],
    }[fc_type]
    assert set(has) <= set(args), sorted(set(has) - set(args))
    if fc_type == "H":
        assert "bn1_gamma" not in args
    if fc_type == "GDC":
        assert args["conv_6dw7_7_conv2d_weight"] == (128, 1, 7, 7)


@pytest.mark.parametrize("options", [
    {"net_unit": 1}, {"net_unit": 2}, {"net_input": 0}, {"net_input": 2}, {"net_se": 1}, {"net_act": "relu"},
])
def test_fresnet_variants(options):
    sym = symbols.get_embedding("r18", emb_size=16, net_multiplier=0.25, **options)
    args, _, out = arg_aux_shapes(sym)
    spatial_out = (2, 16)
    assert out == [spatial_out]
    if options.get("net_se"):
        assert args["stage1_unit1_se_conv1_weight"] == (1, 16, 1, 1)
        assert "stage1_unit1_se_conv2_bias" in args
    if options.get("net_act") == "relu":
        assert not [k for k in args if k.endswith("relu1_gamma")]
    if options.get("net_input") == 2:
        assert "bn_data_gamma" in args
    if options.get("net_input") == 0:
        # 7x7/2 stem then four stride-2 stages: 112 -> 56 -> ... -> 4, so pre_fc1 sees 4x4 maps
        assert args["conv0_weight"] == (16, 3, 7, 7)
        assert args["pre_fc1_weight"] == (16, 128 * 16)


def test_bottleneck_threshold_old_option():
    """HEAD builds r101 from basic blocks; with OLD's threshold (101) it is a bottleneck net with convd."""
    head_args, _, _ = arg_aux_shapes(symbols.get_embedding("r101", emb_size=16, net_multiplier=0.125))
    assert "stage1_unit1_conv3_weight" not in head_args
    old_args, _, out = arg_aux_shapes(symbols.get_embedding("r101", emb_size=16, net_multiplier=0.125,
                                                           net_bottleneck_from=101))
    assert old_args["stage1_unit1_conv3_weight"] == (32, 8, 1, 1)
    assert old_args["convd_weight"] == (512, 256, 1, 1)
    assert out == [(2, 16)]


def test_input_normalisation_inside_network():
    """(x - 127.5) * 0.0078125 happens in the graph: constant 127.5 input gives an all-zero conv0 output."""
    sym = symbols.get_embedding("r18", emb_size=8, net_multiplier=0.125)
    conv0 = sym.get_internals()["conv0_output"]
    ex = conv0.simple_bind(mx.cpu(), data=(1, 3, 8, 8), grad_req="null")
    ex.arg_dict["conv0_weight"][:] = 1.0
    ex.arg_dict["data"][:] = 127.5
    ex.forward(is_train=False)
    assert np.abs(ex.outputs[0].asnumpy()).max() == 0.0
    ex.arg_dict["data"][:] = 255.0
    ex.forward(is_train=False)
    # centre pixel: 27 taps of (255 - 127.5) / 128
    assert ex.outputs[0].asnumpy()[0, 0, 4, 4] == pytest.approx(27 * 127.5 * 0.0078125)


def test_initializer_xavier_gaussian_out_and_init_attrs():
    init = symbols.get_initializer("r18")
    assert isinstance(init, mx.init.Xavier)
    assert json.loads(init.dumps()) == ["xavier", {"rnd_type": "gaussian", "factor_type": "out", "magnitude": 2}]
    sym = symbols.get_symbol({"network": "r18", "net_multiplier": 0.25, "emb_size": 64, "num_classes": 4000,
                              "per_batch_size": 2})
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind(data_shapes=[("data", DATA)], label_shapes=[("softmax_label", (2,))], for_training=False)
    mx.random.seed(0)
    mod.init_params(init)
    args, aux = mod.get_params()
    for name, value in args.items():
        if name.endswith("relu1_gamma") or name == "relu0_gamma":
            assert np.all(value.asnumpy() == 0.25), name
    assert np.all(args["bn0_gamma"].asnumpy() == 1.0) and np.all(aux["bn0_moving_var"].asnumpy() == 1.0)
    assert args["fc7_weight"].asnumpy().std() == pytest.approx(0.01, rel=0.05)
    # Xavier gaussian 'out': std = sqrt(2 / (out * kh * kw))
    w = args["stage3_unit1_conv2_weight"].asnumpy()
    assert w.std() == pytest.approx(np.sqrt(2.0 / (64 * 9)), rel=0.05)
    assert np.all(args["pre_fc1_bias"].asnumpy() == 0.0)


# ----------------------------------------------------------------------------- residual unit layer attributes
# Written from insightface HEAD 7fadd420 recognition/arcface_mxnet/symbol/fresnet.py (same in OLD
# src/symbols/fresnet.py): (kernel, stride, pad) of each conv of a stage's FIRST unit (stride 2, projection
# shortcut). residual_unit dispatches net_unit 1 to residual_unit_v1 when net_input == 0, else to
# residual_unit_v1_L; 2 to residual_unit_v2; 3 to residual_unit_v3.
K1, K3, S1, S2, P0, P1 = (1, 1), (3, 3), (1, 1), (2, 2), (0, 0), (1, 1)
UNIT_CONVS = {
    # residual_unit_v1: the first conv carries the stride
    ("v1", False): {"conv1": (K3, S2, P1), "conv2": (K3, S1, P1), "conv1sc": (K1, S2, P0)},
    ("v1", True): {"conv1": (K1, S2, P0), "conv2": (K3, S1, P1), "conv3": (K1, S1, P0), "conv1sc": (K1, S2, P0)},
    # residual_unit_v1_L: the last conv carries it (basic: conv2; bottleneck: the 1x1 conv3, NOT the 3x3 conv2)
    ("v1_L", False): {"conv1": (K3, S1, P1), "conv2": (K3, S2, P1), "conv1sc": (K1, S2, P0)},
    ("v1_L", True): {"conv1": (K1, S1, P0), "conv2": (K3, S1, P1), "conv3": (K1, S2, P0), "conv1sc": (K1, S2, P0)},
    # residual_unit_v2: basic conv1, bottleneck the 3x3 conv2; the shortcut conv is named _sc (no BN)
    ("v2", False): {"conv1": (K3, S2, P1), "conv2": (K3, S1, P1), "sc": (K1, S2, P0)},
    ("v2", True): {"conv1": (K1, S1, P0), "conv2": (K3, S2, P1), "conv3": (K1, S1, P0), "sc": (K1, S2, P0)},
    # residual_unit_v3 (IR): basic conv2, bottleneck conv3
    ("v3", False): {"conv1": (K3, S1, P1), "conv2": (K3, S2, P1), "conv1sc": (K1, S2, P0)},
    ("v3", True): {"conv1": (K1, S1, P0), "conv2": (K3, S1, P1), "conv3": (K1, S2, P0), "conv1sc": (K1, S2, P0)},
}
UNIT_VERSION = {(1, 0): "v1", (1, 1): "v1_L", (1, 2): "v1_L", (2, 0): "v2", (2, 1): "v2", (3, 0): "v3", (3, 1): "v3",
                (3, 2): "v3"}


def _tuple_attr(attrs, key, default):
    text = attrs.get(key)
    if text is None:
        return default
    return tuple(int(v) for v in text.strip("()[] ").split(",") if v.strip())


def unit_convs(sym, unit):
    """{conv suffix: (kernel, stride, pad)} of the Convolution nodes of ``unit``, read from the symbol JSON."""
    pattern = re.compile(rf"^{unit}_(conv\d|conv1sc|sc)$")
    out = {}
    for node in json.loads(sym.tojson())["nodes"]:
        match = pattern.match(node["name"])
        if node["op"] == "Convolution" and match:
            attrs = node.get("attrs", {})
            out[match.group(1)] = (_tuple_attr(attrs, "kernel", None), _tuple_attr(attrs, "stride", S1),
                                   _tuple_attr(attrs, "pad", P0))
    return out


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("net_unit,net_input", sorted(UNIT_VERSION))
def test_residual_unit_conv_attributes_match_upstream(net_unit, net_input, bottleneck):
    """Kernel/stride/pad of every conv of every unit version: shapes cannot tell where the stride is."""
    version = UNIT_VERSION[(net_unit, net_input)]
    options = {"net_unit": net_unit, "net_input": net_input, "net_multiplier": 0.125}
    if bottleneck:
        options["net_bottleneck_from"] = 18
    sym = symbols.get_embedding("r18", emb_size=8, **options)
    for stage in (1, 2, 3, 4):
        assert unit_convs(sym, f"stage{stage}_unit1") == UNIT_CONVS[(version, bottleneck)], (version, stage)
        # the second unit of a stage: stride 1 everywhere, identity shortcut
        expected = {name: (k, S1, p) for name, (k, _, p) in UNIT_CONVS[(version, bottleneck)].items()
                    if name not in ("conv1sc", "sc")}
        assert unit_convs(sym, f"stage{stage}_unit2") == expected, (version, stage)
    # the stage still halves the map (112 -> 7 with the 3x3/1 stem; 7x7/2 stem: 56 -> 4)
    internals = sym.get_internals()
    _, out, _ = internals[f"stage4_unit2_conv{3 if bottleneck else 2}_output"].infer_shape(data=(1, 3, 112, 112))
    assert out[0][2:] == ((4, 4) if net_input == 0 else (7, 7))


def test_unit_4_is_refused_with_the_upstream_reason():
    """insightface's residual_unit sends version_unit 4 to residual_unit_v4, which it never defines."""
    with pytest.raises(ValueError, match="residual_unit_v4"):
        symbols.get_embedding("r18", emb_size=8, net_unit=4, net_multiplier=0.125)
