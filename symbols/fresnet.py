"""fresnet: insightface's face ResNets ("LResNet-E-IR"), r18 ... r269.

Source: insightface HEAD 7fadd420 ``recognition/arcface_mxnet/symbol/fresnet.py`` (``residual_unit_v1``,
``residual_unit_v1_L``, ``residual_unit_v2``, ``residual_unit_v3``, ``residual_unit``, ``resnet``,
``get_symbol``); OLD ``src/symbols/fresnet.py`` (0972924a) has the same units.

Default = ``net_input=1`` (3x3 stride-1 stem, so 112 -> 56 -> 28 -> 14 -> 7 over the four stride-2
stages), ``net_unit=3`` (the "IR" unit BN-Conv-BN-PReLU-Conv-BN + shortcut, no activation after
the add), ``net_output='E'`` head. Parameter names equal insightface's (``conv0_weight``,
``stage1_unit1_bn1_gamma``, ``stage1_unit1_relu1_gamma``, ``stage1_unit1_conv1sc_weight``,
``stage1_unit1_sc_moving_mean``, ``bn1_*``, ``pre_fc1_weight``, ``fc1_*``) so checkpoints load by name.

Which convolution of a unit carries the stage's stride (upstream, every version; checked by
tests/test_networks.py from the symbol JSON):

| unit (net_unit, net_input)  | basic (3x3, 3x3) | bottleneck (1x1, 3x3, 1x1) |
|-----------------------------|------------------|----------------------------|
| v1   (1, input 0)           | conv1            | conv1                      |
| v1_L (1, input 1 or 2)      | conv2            | conv3                      |
| v2   (2)                    | conv1            | conv2                      |
| v3   (3, default)           | conv2            | conv3                      |

The projection shortcut (``conv1sc``, v2 ``sc``) is a 1x1 conv with the same stride. Upstream's dispatch
``residual_unit`` sends ``version_unit == 4`` to ``residual_unit_v4``, which no insightface commit defines
(a NameError there); it is refused here with a clear error.
"""
import logging

import mxnet as mx

from .common import BN_EPS, act, batchnorm, conv, normalize_input
from .heads import get_fc1
from .registry import register_network

logger = logging.getLogger(__name__)

# num_layers -> residual units per stage (union of the tables of OLD and HEAD fresnet.get_symbol).
UNITS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    49: [3, 4, 14, 3],
    50: [3, 4, 14, 3],
    74: [3, 6, 24, 3],
    90: [3, 8, 30, 3],
    98: [3, 4, 38, 3],
    99: [3, 8, 35, 3],
    100: [3, 13, 30, 3],
    101: [3, 4, 23, 3],
    124: [3, 13, 40, 5],
    134: [3, 10, 50, 3],
    136: [3, 13, 48, 3],
    140: [3, 15, 48, 3],
    152: [3, 8, 36, 3],
    160: [3, 24, 49, 3],
    200: [3, 24, 36, 3],
    269: [3, 30, 48, 8],
}
BASIC_FILTERS = [64, 64, 128, 256, 512]
BOTTLENECK_FILTERS = [64, 256, 512, 1024, 2048]
# HEAD uses bottleneck units only from 500 layers (so r101/r152 are basic-block nets); OLD from 101.
HEAD_BOTTLENECK_FROM = 500
OLD_BOTTLENECK_FROM = 101
# SE reduction ratio (squeeze to num_filter // 16 channels).
SE_REDUCTION = 16


class _UnitBuilder:
    """Holds the options every residual unit shares (bn momentum, workspace, activation, SE)."""

    def __init__(self, bn_mom, workspace, act_type, use_se, fast_prelu):
        self.bn_mom = bn_mom
        self.workspace = workspace
        self.act_type = act_type
        self.use_se = use_se
        self.fast_prelu = fast_prelu

    def bn(self, data, name, fix_gamma=False):
        return batchnorm(data, name, bn_mom=self.bn_mom, eps=BN_EPS, fix_gamma=fix_gamma)

    def conv(self, data, num_filter, kernel, stride, pad, name, no_bias=True):
        return conv(data, num_filter, kernel, stride=stride, pad=pad, name=name, no_bias=no_bias,
                    workspace=self.workspace)

    def act(self, data, name, num_channels):
        return act(data, self.act_type, name, num_channels=num_channels, fast_prelu=self.fast_prelu)

    def se(self, body, num_filter, name):
        """Squeeze-and-excitation on ``body``: avg pool -> 1x1 conv f/16 (+bias) -> Act -> 1x1 conv f -> sigmoid."""
        squeeze = max(1, num_filter // SE_REDUCTION)
        gate = mx.sym.Pooling(data=body, global_pool=True, kernel=(7, 7), pool_type="avg", name=name + "_se_pool1")
        gate = self.conv(gate, squeeze, (1, 1), (1, 1), (0, 0), name + "_se_conv1", no_bias=False)
        gate = self.act(gate, name + "_se_relu1", squeeze)
        gate = self.conv(gate, num_filter, (1, 1), (1, 1), (0, 0), name + "_se_conv2", no_bias=False)
        gate = mx.sym.Activation(data=gate, act_type="sigmoid", name=name + "_se_sigmoid")
        return mx.sym.broadcast_mul(body, gate)

    def shortcut(self, data, num_filter, stride, dim_match, name):
        if dim_match:
            return data
        sc = self.conv(data, num_filter, (1, 1), stride, (0, 0), name + "_conv1sc")
        return self.bn(sc, name + "_sc")

    def unit_v3(self, data, num_filter, stride, dim_match, name, bottle_neck):
        """IR unit: BN -> conv3x3 -> BN -> Act -> conv3x3/stride -> BN (+SE) + shortcut (no post-add Act)."""
        if bottle_neck:
            inner = int(num_filter * 0.25)
            body = self.bn(data, name + "_bn1")
            body = self.conv(body, inner, (1, 1), (1, 1), (0, 0), name + "_conv1")
            body = self.bn(body, name + "_bn2")
            body = self.act(body, name + "_relu1", inner)
            body = self.conv(body, inner, (3, 3), (1, 1), (1, 1), name + "_conv2")
            body = self.bn(body, name + "_bn3")
            body = self.act(body, name + "_relu2", inner)
            body = self.conv(body, num_filter, (1, 1), stride, (0, 0), name + "_conv3")
            body = self.bn(body, name + "_bn4")
        else:
            body = self.bn(data, name + "_bn1")
            body = self.conv(body, num_filter, (3, 3), (1, 1), (1, 1), name + "_conv1")
            body = self.bn(body, name + "_bn2")
            body = self.act(body, name + "_relu1", num_filter)
            body = self.conv(body, num_filter, (3, 3), stride, (1, 1), name + "_conv2")
            body = self.bn(body, name + "_bn3")
        if self.use_se:
            body = self.se(body, num_filter, name)
        return body + self.shortcut(data, num_filter, stride, dim_match, name)

    def unit_v1(self, data, num_filter, stride, dim_match, name, bottle_neck, large_input):
        """ResNet-v1 post-activation unit: conv/BN/Act blocks (+SE) + shortcut -> Act ``relu3``.

        ``large_input`` False is insightface's ``residual_unit_v1`` (net_input 0): the FIRST conv carries the
        stride. True is ``residual_unit_v1_L`` (net_input 1/2): the LAST conv does (conv3 of a bottleneck,
        conv2 of a basic unit), so the 3x3 conv of a bottleneck keeps stride 1.
        """
        convs = 3 if bottle_neck else 2
        strided = convs if large_input else 1
        strides = {i: stride if i == strided else (1, 1) for i in range(1, convs + 1)}
        if bottle_neck:
            inner = int(num_filter * 0.25)
            body = self.conv(data, inner, (1, 1), strides[1], (0, 0), name + "_conv1")
            body = self.bn(body, name + "_bn1")
            body = self.act(body, name + "_relu1", inner)
            body = self.conv(body, inner, (3, 3), strides[2], (1, 1), name + "_conv2")
            body = self.bn(body, name + "_bn2")
            body = self.act(body, name + "_relu2", inner)
            body = self.conv(body, num_filter, (1, 1), strides[3], (0, 0), name + "_conv3")
            body = self.bn(body, name + "_bn3")
        else:
            body = self.conv(data, num_filter, (3, 3), strides[1], (1, 1), name + "_conv1")
            body = self.bn(body, name + "_bn1")
            body = self.act(body, name + "_relu1", num_filter)
            body = self.conv(body, num_filter, (3, 3), strides[2], (1, 1), name + "_conv2")
            body = self.bn(body, name + "_bn2")
        if self.use_se:
            body = self.se(body, num_filter, name)
        body = body + self.shortcut(data, num_filter, stride, dim_match, name)
        return self.act(body, name + "_relu3", num_filter)

    def unit_v2(self, data, in_channels, num_filter, stride, dim_match, name, bottle_neck):
        """Pre-activation unit: BN -> Act -> conv/stride -> BN -> Act -> conv (+SE) + shortcut (from act1)."""
        bn1 = self.bn(data, name + "_bn1")
        act1 = self.act(bn1, name + "_relu1", in_channels)
        if bottle_neck:
            inner = int(num_filter * 0.25)
            body = self.conv(act1, inner, (1, 1), (1, 1), (0, 0), name + "_conv1")
            body = self.bn(body, name + "_bn2")
            body = self.act(body, name + "_relu2", inner)
            body = self.conv(body, inner, (3, 3), stride, (1, 1), name + "_conv2")
            body = self.bn(body, name + "_bn3")
            body = self.act(body, name + "_relu3", inner)
            body = self.conv(body, num_filter, (1, 1), (1, 1), (0, 0), name + "_conv3")
        else:
            body = self.conv(act1, num_filter, (3, 3), stride, (1, 1), name + "_conv1")
            body = self.bn(body, name + "_bn2")
            body = self.act(body, name + "_relu2", num_filter)
            body = self.conv(body, num_filter, (3, 3), (1, 1), (1, 1), name + "_conv2")
        if self.use_se:
            body = self.se(body, num_filter, name)
        if dim_match:
            shortcut = data
        else:
            shortcut = self.conv(act1, num_filter, (1, 1), stride, (0, 0), name + "_sc")
        return body + shortcut

    def unit(self, version_unit, version_input, data, in_channels, num_filter, stride, dim_match, name,
             bottle_neck):
        """insightface's ``residual_unit`` dispatch: 1 -> v1 (input 0) / v1_L (input != 0), 2 -> v2, else v3."""
        if version_unit == 1:
            return self.unit_v1(data, num_filter, stride, dim_match, name, bottle_neck,
                                large_input=version_input != 0)
        if version_unit == 2:
            return self.unit_v2(data, in_channels, num_filter, stride, dim_match, name, bottle_neck)
        return self.unit_v3(data, num_filter, stride, dim_match, name, bottle_neck)


def filter_list(num_layers, multiplier=1.0, bottleneck_from=HEAD_BOTTLENECK_FROM):
    """Return ``(filters, bottle_neck)``: the 5 channel widths (stem + 4 stages) scaled by ``multiplier``.

    ``int(f * multiplier)`` per entry, e.g. r18 at 0.25 -> [16, 16, 32, 64, 128].
    """
    bottle_neck = num_layers >= bottleneck_from
    base = BOTTLENECK_FILTERS if bottle_neck else BASIC_FILTERS
    filters = [max(1, int(f * multiplier)) for f in base]
    return filters, bottle_neck


def get_symbol(num_layers, emb_size=512, fc_type="E", net_input=1, net_unit=3, net_se=0, net_act="prelu",
               bn_mom=0.9, workspace=256, net_multiplier=1.0, fast_prelu=True,
               net_bottleneck_from=HEAD_BOTTLENECK_FROM):
    """Build the fresnet embedding symbol (registered as ``r<depth>``, ``r100fc``, ``r50v1``).

    Keyword defaults equal configs/base.py's values (tests/test_registry.py checks).

    Parameters
    ----------
    num_layers : int
        Depth, a key of :data:`UNITS` (18, 34, 50, 100, 152, ...).
    emb_size : int
        D, the embedding size (``fc1`` has D outputs).
    fc_type : str
        Embedding head type of :func:`symbols.heads.get_fc1` ('E' default).
    net_input : int
        Stem: 0 = conv0 7x7/2 pad 3, 1 = conv0 3x3/1 pad 1 (default), 2 = BN ``bn_data`` on the raw input
        then conv0 3x3/1 (no (x - 127.5)/128 normalisation, as insightface).
    net_unit : int
        Residual unit version: 1 (v1 with net_input 0, v1_L otherwise), 2 (v2 pre-activation), 3 (default IR
        unit). See the module table for which conv carries the stride.
    net_se : int
        1 adds squeeze-and-excitation to every unit.
    net_act : str
        'prelu' or an ``mx.sym.Activation`` type.
    bn_mom, workspace : float, int
        BatchNorm momentum, convolution workspace (MB).
    net_multiplier : float
        Scales every width of the filter list (1.0 = insightface's widths).
    fast_prelu : bool
        Build PReLU as relu(x) - gamma*relu(-x) (see :func:`symbols.common.prelu`).
    net_bottleneck_from : int
        Depth from which bottleneck units are used (HEAD 500, OLD 101).

    Inputs / Outputs
    ----------------
    ``data`` (B, 3, H, W) RGB 0..255 (112x112 gives a 7x7 map before the head) -> ``fc1_output`` (B, D).
    """
    if num_layers not in UNITS:
        raise ValueError(f"fresnet: no units table for num_layers={num_layers}; valid depths: {sorted(UNITS)}")
    if net_input not in (0, 1, 2):
        raise ValueError(f"fresnet: net_input={net_input!r} is not one of 0, 1, 2")
    if net_unit not in (1, 2, 3):
        raise ValueError(f"fresnet: net_unit={net_unit!r} is not one of 1, 2, 3 (insightface's residual_unit "
                         "dispatches 4 to residual_unit_v4, which no insightface commit defines)")
    units = UNITS[num_layers]
    filters, bottle_neck = filter_list(num_layers, net_multiplier, net_bottleneck_from)
    builder = _UnitBuilder(bn_mom, workspace, net_act, bool(net_se), fast_prelu)

    data = mx.sym.Variable(name="data")
    if net_input == 2:
        body = builder.bn(data, "bn_data", fix_gamma=True)
        body = builder.conv(body, filters[0], (3, 3), (1, 1), (1, 1), "conv0")
    else:
        data = mx.sym.identity(data=data, name="id")
        body = normalize_input(data)
        if net_input == 0:
            body = builder.conv(body, filters[0], (7, 7), (2, 2), (3, 3), "conv0")
        else:
            body = builder.conv(body, filters[0], (3, 3), (1, 1), (1, 1), "conv0")
    body = builder.bn(body, "bn0")
    body = builder.act(body, "relu0", filters[0])

    in_channels = filters[0]
    for stage, num_units in enumerate(units):
        num_filter = filters[stage + 1]
        body = builder.unit(net_unit, net_input, body, in_channels, num_filter, (2, 2), False,
                            f"stage{stage + 1}_unit1", bottle_neck)
        for j in range(num_units - 1):
            body = builder.unit(net_unit, net_input, body, num_filter, num_filter, (1, 1), True,
                                f"stage{stage + 1}_unit{j + 2}", bottle_neck)
        in_channels = num_filter
    if bottle_neck:
        # HEAD reduces the 2048-channel bottleneck output to 512 before the head.
        in_channels = 512
        body = builder.conv(body, in_channels, (1, 1), (1, 1), (0, 0), "convd")
        body = builder.bn(body, "bnd")
        body = builder.act(body, "relud", in_channels)
    return get_fc1(body, emb_size, fc_type, in_channels=in_channels, bn_mom=bn_mom, act_type=net_act,
                   fast_prelu=fast_prelu, workspace=workspace)


def _register(name, num_layers, preset=None):
    """Register ``name`` as fresnet of ``num_layers`` (options: the keyword parameters of get_symbol)."""
    register_network(name, preset=preset, fixed={"num_layers": num_layers}, initializer="gaussian_out")(get_symbol)


for _depth in UNITS:
    _register(f"r{_depth}", _depth)
# HEAD sample_config.py network presets beyond the plain depths.
_register("r100fc", 100, {"net_output": "FC"})
_register("r50v1", 50, {"net_unit": 1})
