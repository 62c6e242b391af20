"""Building blocks shared by every backbone: input normalisation, activation (incl. fast PReLU), conv, BN.

All helpers build plain ``mx.sym`` graphs and name their parameters exactly as insightface does
(``<name>_weight``, ``<name>_gamma``, ``<name>_moving_mean``, ...), so that insightface checkpoints
load by name.
"""
import logging

import mxnet as mx

logger = logging.getLogger(__name__)

# Input normalisation done inside the network (spec §1.2): x = (x - 127.5) * 0.0078125,
# 0.0078125 = 1/128 maps RGB 0..255 to about [-1, 1).
PIXEL_MEAN = 127.5
PIXEL_SCALE = 0.0078125

# insightface's PReLU slope initial value (mxnet's LeakyReLU(act_type='prelu') sets it on its gamma input).
PRELU_INIT = 0.25

# BatchNorm epsilon of fresnet units and of the embedding heads; MobileFaceNet blocks use MXNet's default 1e-3.
BN_EPS = 2e-5
MXNET_DEFAULT_BN_EPS = 1e-3


def normalize_input(data):
    """Return ``(data - 127.5) * 0.0078125`` (RGB 0..255 -> about [-1, 1))."""
    data = data - PIXEL_MEAN
    return data * PIXEL_SCALE


def prelu(data, name, num_channels, fast=True, ndim=4):
    """Per-channel PReLU ``y = x if x > 0 else gamma_c * x`` with slope parameter ``<name>_gamma`` (C,).

    Parameters
    ----------
    data : Symbol
        Input of shape (B, C, ...) (4-D feature map or 2-D features).
    name : str
        Layer name; the slope parameter is ``<name>_gamma`` as with ``LeakyReLU(act_type='prelu', name=name)``.
    num_channels : int
        C, the size of axis 1 (the slope variable needs its shape for the broadcast formulation).
    ndim : int
        Rank of ``data`` (4 for feature maps, 2 for (B, C) features); sets the slope's broadcast shape.
    fast : bool
        False -> ``LeakyReLU(act_type='prelu')`` (insightface's graph). True -> the same function written as

        .. math:: y = \\mathrm{relu}(x) - \\gamma_c \\cdot \\mathrm{relu}(-x)

        with ``gamma`` reshaped to (1, C, 1, 1) and broadcast. Outputs and gradients (wrt x and gamma) are
        identical up to float rounding; on CPU it trains several times faster, because MXNet 1.9's prelu
        kernels are plain loops (no MKLDNN), while relu and broadcast_mul are vectorised.

    Returns
    -------
    Symbol of the same shape as ``data``.
    """
    if not fast:
        return mx.sym.LeakyReLU(data=data, act_type="prelu", name=name)
    gamma = mx.sym.Variable(name + "_gamma", shape=(num_channels,), init=mx.init.Constant(PRELU_INIT))
    return fast_prelu(data, gamma, name, ndim=ndim)


def fast_prelu(data, gamma, name, ndim=4):
    """``relu(x) - gamma * relu(-x)`` with ``gamma`` (C,) broadcast over every axis but 1."""
    pos = mx.sym.Activation(data=data, act_type="relu", name=name + "_pos")
    neg = mx.sym.Activation(data=mx.sym.negative(data, name=name + "_negx"), act_type="relu", name=name + "_neg")
    slope = mx.sym.reshape(gamma, shape=(1, -1) + (1,) * (ndim - 2), name=name + "_slope")
    return mx.sym.broadcast_sub(pos, mx.sym.broadcast_mul(slope, neg), name=name)


def act(data, act_type, name, num_channels=None, fast_prelu=True):
    """insightface's ``Act``: PReLU (``<name>_gamma``) when ``act_type == 'prelu'``, else ``Activation``.

    ``num_channels`` is required for the fast PReLU formulation (see :func:`prelu`).
    """
    if act_type == "prelu":
        if fast_prelu and num_channels is None:
            raise ValueError(f"act(name={name!r}): fast PReLU needs num_channels (the size of axis 1); "
                             "pass it or use fast_prelu=False")
        return prelu(data, name, num_channels, fast=fast_prelu)
    return mx.sym.Activation(data=data, act_type=act_type, name=name)


def batchnorm(data, name, bn_mom=0.9, eps=BN_EPS, fix_gamma=False):
    """``BatchNorm`` with insightface's resnet settings (fix_gamma False, eps 2e-5, momentum bn_mom)."""
    return mx.sym.BatchNorm(data=data, fix_gamma=fix_gamma, eps=eps, momentum=bn_mom, name=name)


def conv(data, num_filter, kernel, stride=(1, 1), pad=(0, 0), name=None, num_group=1, no_bias=True,
         workspace=256):
    """``Convolution`` without bias (insightface default) and the given workspace (MB)."""
    return mx.sym.Convolution(data=data, num_filter=num_filter, kernel=kernel, stride=stride, pad=pad,
                              num_group=num_group, no_bias=no_bias, workspace=workspace, name=name)
