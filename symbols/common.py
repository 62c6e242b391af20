"""Building blocks shared by every backbone: input normalisation, activation (incl. fast PReLU), conv, BN.

All helpers build plain ``mx.sym`` graphs and name their parameters exactly as insightface does
(``<name>_weight``, ``<name>_gamma``, ``<name>_moving_mean``, ...), so that insightface checkpoints
load by name.
"""
import logging

import mxnet as mx

logger = logging.getLogger(__name__)

# Input normalisation done inside the network (insightface fresnet.resnet / fmobilefacenet.get_symbol):
# x = (x - 127.5) * 0.0078125; 0.0078125 = 1/128 maps RGB 0..255 to about [-1, 1).
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
        Input of shape (B, C, H, W) (``ndim=4``) or (B, C) (``ndim=2``).
    name : str
        Layer name; the slope parameter is ``<name>_gamma`` (shape (C,), ``__init__`` Constant(0.25)), as
        with ``LeakyReLU(act_type='prelu', name=name)``.
    num_channels : int
        C, the size of axis 1.
    fast : bool
        False -> ``LeakyReLU(act_type='prelu')`` (insightface's graph). True -> the :func:`fast_prelu` graph, or
        the fused C++ operator of :mod:`symbols.ops` when it is allowed (``ops.set_enabled``; opt-in) and loaded; all three
        have the same parameter and the same numbers (checkpoints written by the engine always hold a graph that
        needs no library, see :func:`symbols.ops.portable_symbol`).
    ndim : int
        Rank of ``data`` (4 or 2).

    Returns
    -------
    Symbol of the same shape as ``data``.
    """
    if not fast:
        return mx.sym.LeakyReLU(data=data, act_type="prelu", name=name)
    gamma = mx.sym.Variable(name + "_gamma", shape=(num_channels,), init=mx.init.Constant(PRELU_INIT))
    from . import ops
    if ops.available():
        return ops.prelu_op(data, gamma, name, num_channels)
    return fast_prelu(data, gamma, name, num_channels, ndim=ndim)


def fast_prelu(data, gamma, name, num_channels, ndim=4):
    r"""PReLU as ``relu(x) + gamma * (x - relu(x))``, the per-channel product done by a depthwise convolution.

    .. math:: y = \mathrm{relu}(x) + \mathrm{dwconv}_{1}\big(x - \mathrm{relu}(x),\ \gamma\big)

    where the depthwise (``num_group = C``) kernel-1 convolution runs on x reshaped to (B, C, H*W) and its
    weight is ``gamma`` reshaped to (C, 1, 1).

    Why: MXNet 1.9's CPU kernels for ``LeakyReLU(prelu)`` and for the backward of any broadcast op with a
    (1, C, 1, 1) operand reduce over batch and space with slow generic loops (profiled: slower than all
    convolutions of r18 together). A depthwise convolution computes the same per-channel product with MKLDNN,
    and its weight gradient is exactly dL/dgamma_c = sum(g * min(x, 0)). Forward values and gradients equal
    PReLU's up to float summation order. Works for (B, C, H, W) and (B, C) inputs (``ndim`` is accepted for
    symmetry with :func:`prelu`).

    Two MKLDNN traps shape the graph: (1) the convolution is 1-D because MKLDNN's inference subgraph pass
    rewrites 2-D convolutions into fused ops that cache their weight at the first forward, and a weight
    computed from gamma is then never refreshed (an inference Module sharing the training Module's parameters
    would keep the initial slopes); 1-D convolutions are left alone. (2) ``Flatten`` brings the convolution's
    MKLDNN-layout (B, C, H*W) output back to the default layout: adding it to the 4-D relu output directly
    makes MKLDNN's sum primitive fail on the mismatched memory descriptors.
    """
    pos = mx.sym.Activation(data=data, act_type="relu", name=name + "_pos")
    neg = mx.sym.elemwise_sub(data, pos, name=name + "_negpart")
    flat = mx.sym.reshape(neg, shape=(0, 0, -1), name=name + "_flat")
    weight = mx.sym.reshape(gamma, shape=(num_channels, 1, 1), name=name + "_weight")
    scaled = mx.sym.Convolution(data=flat, weight=weight, num_filter=num_channels, num_group=num_channels,
                                kernel=(1,), no_bias=True, name=name + "_scale")
    scaled = mx.sym.reshape_like(mx.sym.Flatten(scaled, name=name + "_flatten"), data, name=name + "_scaled")
    return mx.sym.elemwise_add(pos, scaled, name=name)


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
