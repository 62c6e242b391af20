"""MobileFaceNet (network names ``y1``/``y2``).

Source: insightface HEAD 7fadd420 ``recognition/arcface_mxnet/symbol/fmobilefacenet.py`` (``Conv``, ``Linear``,
``DResidual``, ``Residual``, ``get_symbol``); presets from HEAD ``sample_config.py`` ``network.y1`` / ``network.y2``.

Blocks: ``Conv`` = conv (no bias) ``<n>_conv2d`` + BN ``<n>_batchnorm`` (MXNet's default eps 1e-3) +
Act ``<n>_relu``; ``Linear`` = conv + BN; ``DResidual`` = ``_conv_sep`` 1x1 Conv -> ``_conv_dw``
depthwise 3x3/stride Conv -> ``_conv_proj`` 1x1 Linear; ``Residual(n)`` = n x (DResidual + identity)
named ``<name>_block<i>``.

| stage     | op                                              | out (112 input) |
|-----------|-------------------------------------------------|-----------------|
| conv_1    | Conv 3x3/2, 64                                  | 56x56x64        |
| conv_2_dw | blocks[0]==1: dw Conv 3x3, else Residual res_2  | 56x56x64        |
| dconv_23  | DResidual(64, /2, G=128)                        | 28x28x64        |
| res_3     | Residual(blocks[1], 64, G=128)                  | 28x28x64        |
| dconv_34  | DResidual(128, /2, G=256)                       | 14x14x128       |
| res_4     | Residual(blocks[2], 128, G=256)                 | 14x14x128       |
| dconv_45  | DResidual(128, /2, G=512)                       | 7x7x128         |
| res_5     | Residual(blocks[3], 128, G=256)                 | 7x7x128         |
| conv_6sep | Conv 1x1, 512                                   | 7x7x512         |
"""
import mxnet as mx

from .common import MXNET_DEFAULT_BN_EPS, act, batchnorm, conv, normalize_input
from .heads import get_fc1
from .registry import register_network

# Channels of conv_6sep, the map the embedding head sees.
LAST_CHANNELS = 512


class _Blocks:
    """MobileFaceNet's Conv/Linear/DResidual/Residual blocks with shared bn_mom/activation options."""

    def __init__(self, bn_mom, act_type, fast_prelu, workspace):
        self.bn_mom = bn_mom
        self.act_type = act_type
        self.fast_prelu = fast_prelu
        self.workspace = workspace

    def linear(self, data, num_filter, kernel=(1, 1), stride=(1, 1), pad=(0, 0), num_group=1, name=None,
               suffix=""):
        body = conv(data, num_filter, kernel, stride=stride, pad=pad, num_group=num_group,
                    name=f"{name}{suffix}_conv2d", workspace=self.workspace)
        return batchnorm(body, f"{name}{suffix}_batchnorm", bn_mom=self.bn_mom, eps=MXNET_DEFAULT_BN_EPS)

    def conv(self, data, num_filter, kernel=(1, 1), stride=(1, 1), pad=(0, 0), num_group=1, name=None, suffix=""):
        body = self.linear(data, num_filter, kernel, stride, pad, num_group, name, suffix)
        return act(body, self.act_type, f"{name}{suffix}_relu", num_channels=num_filter, fast_prelu=self.fast_prelu)

    def dresidual(self, data, num_out, kernel=(3, 3), stride=(2, 2), pad=(1, 1), num_group=1, name=None,
                  suffix=""):
        body = self.conv(data, num_group, (1, 1), (1, 1), (0, 0), name=f"{name}{suffix}_conv_sep")
        body = self.conv(body, num_group, kernel, stride, pad, num_group=num_group, name=f"{name}{suffix}_conv_dw")
        return self.linear(body, num_out, (1, 1), (1, 1), (0, 0), name=f"{name}{suffix}_conv_proj")

    def residual(self, data, num_block, num_out, num_group, name):
        identity = data
        for i in range(num_block):
            shortcut = identity
            body = self.dresidual(identity, num_out, (3, 3), (1, 1), (1, 1), num_group, name=f"{name}_block",
                                  suffix=str(i))
            identity = body + shortcut
        return identity


@register_network("y2", preset={"emb_size": 256, "net_output": "GDC", "net_blocks": [2, 8, 16, 4]},
                  initializer="gaussian_out")
@register_network("y1", preset={"emb_size": 128, "net_output": "GDC", "net_blocks": [1, 4, 6, 2]},
                  initializer="gaussian_out")
def get_symbol(emb_size=512, fc_type="E", net_blocks=(1, 4, 6, 2), bn_mom=0.9, net_act="prelu", fast_prelu=True,
               workspace=256):
    """Build the MobileFaceNet embedding symbol.

    Keyword defaults equal configs/base.py's values (as HEAD, where the head and size come from the config);
    the ``y1``/``y2`` presets set emb_size 128/256 and the GDC head.

    Parameters
    ----------
    emb_size : int
        D (y1: 128, y2: 256).
    fc_type : str
        Embedding head (insightface's y1/y2 presets use 'GDC').
    net_blocks : sequence of 4 ints
        Residual blocks per stage (y1 [1,4,6,2], y2 [2,8,16,4]).
    bn_mom, net_act, fast_prelu, workspace
        BatchNorm momentum, activation, PReLU formulation, conv workspace (MB).

    Inputs / Outputs
    ----------------
    ``data`` (B, 3, 112, 112) RGB 0..255 -> ``fc1_output`` (B, D).
    """
    blocks = list(net_blocks)
    if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
        raise ValueError(f"fmobilefacenet: net_blocks={net_blocks!r} must be 4 positive ints, e.g. [1, 4, 6, 2]")
    b = _Blocks(bn_mom, net_act, fast_prelu, workspace)
    data = normalize_input(mx.sym.Variable(name="data"))
    body = b.conv(data, 64, (3, 3), (2, 2), (1, 1), name="conv_1")
    if blocks[0] == 1:
        body = b.conv(body, 64, (3, 3), (1, 1), (1, 1), num_group=64, name="conv_2_dw")
    else:
        body = b.residual(body, blocks[0], 64, 64, name="res_2")
    body = b.dresidual(body, 64, num_group=128, name="dconv_23")
    body = b.residual(body, blocks[1], 64, 128, name="res_3")
    body = b.dresidual(body, 128, num_group=256, name="dconv_34")
    body = b.residual(body, blocks[2], 128, 256, name="res_4")
    body = b.dresidual(body, 128, num_group=512, name="dconv_45")
    body = b.residual(body, blocks[3], 128, 256, name="res_5")
    body = b.conv(body, LAST_CHANNELS, (1, 1), (1, 1), (0, 0), name="conv_6sep")
    return get_fc1(body, emb_size, fc_type, in_channels=LAST_CHANNELS, bn_mom=bn_mom, act_type=net_act,
                   fast_prelu=fast_prelu, workspace=workspace)
