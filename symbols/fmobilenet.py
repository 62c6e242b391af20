"""MobileNet-V1 face embedding (network names ``m1``/``m05``), insightface's ``fmobilenet``.

Source: insightface HEAD 7fadd420 ``recognition/arcface_mxnet/symbol/fmobilenet.py`` (``Conv``, ``get_symbol``);
presets from HEAD ``sample_config.py`` ``network.m1`` / ``network.m05`` (emb_size 256, GDC head,
net_multiplier 1.0 / 0.5). The embedding head is ``symbol_utils.get_fc1(body, emb_size, fc_type)`` called with
its default ``input_channel=512`` (see :func:`get_symbol`).

Block ``Conv`` = conv (no bias) ``<n>_conv2d`` + BN ``<n>_batchnorm`` (``fix_gamma=True``, MXNet's default eps
1e-3 and momentum 0.9: insightface passes neither, so ``bn_mom`` does not reach these layers) + Act
``<n>_relu``. ``bf = int(32 * net_multiplier)``; for a 112x112 input:

| layer            | op (stride)              | out, net_input=1 | out, net_input=0 |
|------------------|--------------------------|------------------|------------------|
| conv_1           | Conv 3x3 (1 or 2), bf    | 112x112xbf       | 56x56xbf         |
| conv_2_dw/conv_2 | dw 3x3 (1), pw 2bf       | 112x112x2bf      | 56x56x2bf        |
| conv_3_dw/conv_3 | dw 3x3 (2), pw 4bf       | 56x56x4bf        | 28x28x4bf        |
| conv_4_dw/conv_4 | dw 3x3 (1), pw 4bf       | 56x56x4bf        | 28x28x4bf        |
| conv_5_dw/conv_5 | dw 3x3 (2), pw 8bf       | 28x28x8bf        | 14x14x8bf        |
| conv_6_dw/conv_6 | dw 3x3 (1), pw 8bf       | 28x28x8bf        | 14x14x8bf        |
| conv_7_dw/conv_7 | dw 3x3 (2), pw 16bf      | 14x14x16bf       | 7x7x16bf         |
| conv_8..12       | 5 x (dw 3x3 (1), pw 16bf)| 14x14x16bf       | 7x7x16bf         |
| conv_13_dw/_13   | dw 3x3 (2), pw 32bf      | 7x7x32bf         | 4x4x32bf         |
| conv_14_dw/_14   | dw 3x3 (1), pw 32bf      | 7x7x32bf         | 4x4x32bf         |

(``dw`` = depthwise, ``num_group`` = channels; ``pw`` = pointwise 1x1.) ``net_input=1`` (configs/base.py's
default) is the 3x3/1 stem that gives the 7x7 map the heads expect at 112x112; ``net_input=0`` is ImageNet's
3x3/2 stem (for 224x224 inputs).

OpenCV Zoo's SFace recognizer (``face_recognition_sface_2021dec``) is this network: ``m1`` with
``net_input=1``, PReLU, the ``E`` head (``pre_fc1`` with bias) and ``emb_size=128``;
``python -m recognition.import_onnx --sface`` builds that checkpoint.
"""
import mxnet as mx

from .common import MXNET_DEFAULT_BN_EPS, act, conv, normalize_input
from .heads import get_fc1
from .registry import register_network

# insightface's get_fc1(last_conv, num_classes, fc_type, input_channel=512): fmobilenet does not pass
# input_channel, so the GDC head's depthwise 7x7 conv has 512 groups whatever the width (on m1's 1024 channels
# each group sees 2 channels: conv_6dw7_7_conv2d_weight is (512, 2, 7, 7)).
GET_FC1_INPUT_CHANNEL = 512

# (name, stride of the depthwise conv, pointwise channels as a multiple of bf) for conv_2 .. conv_14.
STAGES = (("conv_2", 1, 2), ("conv_3", 2, 4), ("conv_4", 1, 4), ("conv_5", 2, 8), ("conv_6", 1, 8),
          ("conv_7", 2, 16), ("conv_8", 1, 16), ("conv_9", 1, 16), ("conv_10", 1, 16), ("conv_11", 1, 16),
          ("conv_12", 1, 16), ("conv_13", 2, 32), ("conv_14", 1, 32))


def _conv_block(data, num_filter, kernel, stride, pad, num_group, name, act_type, fast_prelu, workspace):
    """insightface fmobilenet ``Conv``: conv ``<name>_conv2d`` + BN(fix_gamma, eps 1e-3) + Act ``<name>_relu``."""
    body = conv(data, num_filter, kernel, stride=stride, pad=pad, num_group=num_group, name=f"{name}_conv2d",
                workspace=workspace)
    body = mx.sym.BatchNorm(data=body, fix_gamma=True, eps=MXNET_DEFAULT_BN_EPS, momentum=0.9,
                            name=f"{name}_batchnorm")
    return act(body, act_type, f"{name}_relu", num_channels=num_filter, fast_prelu=fast_prelu)


def last_channels(net_multiplier=1.0):
    """Channels of conv_14, the map the embedding head sees (32 * bf)."""
    return int(32 * net_multiplier) * 32


@register_network("m05", preset={"emb_size": 256, "net_output": "GDC", "net_multiplier": 0.5})
@register_network("m1", preset={"emb_size": 256, "net_output": "GDC", "net_multiplier": 1.0})
def get_symbol(emb_size=512, fc_type="E", net_input=1, net_multiplier=1.0, bn_mom=0.9, net_act="prelu",
               fast_prelu=True, workspace=256):
    """Build insightface's fmobilenet embedding symbol.

    Keyword defaults equal configs/base.py's values; the ``m1``/``m05`` presets set emb_size 256, the GDC head
    and the width (``net_multiplier`` 1.0 / 0.5), as HEAD sample_config.

    Parameters
    ----------
    emb_size : int
        D.
    fc_type : str
        Embedding head (m1/m05 presets: 'GDC'; SFace: 'E').
    net_input : int
        0: 3x3/2 stem (insightface ``config.net_input == 0``); anything else: 3x3/1 stem.
    net_multiplier : float
        Width multiplier: ``bf = int(32 * net_multiplier)`` channels in the stem.
    bn_mom : float
        BatchNorm momentum of the embedding head only (the conv blocks use MXNet's default 0.9, as insightface).
    net_act, fast_prelu, workspace
        Activation, PReLU formulation, conv workspace (MB).

    Inputs / Outputs
    ----------------
    ``data`` (B, 3, 112, 112) RGB 0..255 -> ``fc1_output`` (B, D).
    """
    bf = int(32 * net_multiplier)
    if bf < 1:
        raise ValueError(f"fmobilenet: net_multiplier={net_multiplier!r} gives {bf} stem channels; need >= 1/32")

    def block(data, num_filter, kernel, stride, pad, num_group, name):
        return _conv_block(data, num_filter, kernel, stride, pad, num_group, name, net_act, fast_prelu, workspace)

    data = normalize_input(mx.sym.Variable(name="data"))
    stem_stride = (2, 2) if net_input == 0 else (1, 1)
    body = block(data, bf, (3, 3), stem_stride, (1, 1), 1, "conv_1")
    channels = bf
    for name, stride, mult in STAGES:
        body = block(body, channels, (3, 3), (stride, stride), (1, 1), channels, f"{name}_dw")
        channels = bf * mult
        body = block(body, channels, (1, 1), (1, 1), (0, 0), 1, name)
    # GDC: insightface's 512 groups when the width allows it (m1, m05); narrower nets (net_multiplier < 0.5), where
    # insightface's graph fails ("input num_filter must divide group size"), get one group per channel.
    in_channels = GET_FC1_INPUT_CHANNEL if fc_type == "GDC" and channels % GET_FC1_INPUT_CHANNEL == 0 else channels
    return get_fc1(body, emb_size, fc_type, in_channels=in_channels, bn_mom=bn_mom, act_type=net_act,
                   fast_prelu=fast_prelu, workspace=workspace)
