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
        return ops.prelu_op(data, gamma, name, num_channels, ndim=ndim)
    return fast_prelu(data, gamma, name, num_channels, ndim=ndim)


def fast_prelu(data, gamma, name, num_channels, ndim=4):
    r"""PReLU ``y = x if x > 0 else gamma_c * x`` built from operators MXNet 1.9 runs fast on CPU (MKLDNN).

    ``ndim=4`` (every backbone and head): with ``dw_w`` a depthwise (``num_group = C``) kernel-1
    ``Deconvolution`` of weight ``w`` (C, 1, 1, 1),

    .. math:: y = \mathrm{relu}(x) + \mathrm{dw}_{-\gamma}\big(\mathrm{relu}(\mathrm{dw}_{-1}(x))\big)

    i.e. ``relu(x) + gamma * min(x, 0)`` with ``min(x, 0) = -relu(-x)``: negation and relu are exact, so the
    output and dL/dx are bitwise LeakyReLU's (x and g where x > 0, one rounding of gamma * x and gamma * g
    elsewhere), and dL/dgamma_c = sum(g * min(x, 0)) is one direct sum (the weight gradient of ``dw_{-gamma}``,
    negated). The -1 weight is a constant (``-ones_like(gamma)``, no gradient). Any other rank (``ndim`` 2 for
    (B, C), or None when unknown): the rank-agnostic form of earlier versions, ``relu(x) + dwconv1d(reshape(x -
    relu(x), (B, C, -1)), gamma)`` (see :func:`_prelu_any_rank`).

    Why: MXNet 1.9's CPU kernels for ``LeakyReLU(prelu)`` and for the backward of any broadcast op with a
    (1, C, 1, 1) operand reduce over batch and space with slow generic loops (profiled: slower than all
    convolutions of r18 together). Depthwise (de)convolutions compute the same per-channel products with MKLDNN.

    Why this 4-D form (measured on y1, 2 threads, batch 32, ``python -m benchmarks.bench_prelu``):

    * every operator on the activation (Activation, Deconvolution, elemwise_add) keeps MKLDNN's blocked layout.
      Operators without an MKLDNN kernel on that path (``elemwise_sub``, ``Reshape``, any custom operator) pay
      a conversion to NCHW and back, and an allocation, per call and per backward: the reshape/1-D-conv graph
      trained at 0.35x of the ReLU net, this one at 0.62x;
    * ``(1 - gamma) relu(x) + gamma x`` (one relu less, ~5% faster on y1) is not exact, and its gamma gradient
      is the difference of two large sums: 0.5% off on some channels of a (32, 64, 56, 56) activation;
    * ``relu(x) + dw_gamma(x + dw_-1(relu(x)))`` is exact but feeds the BatchNorm output straight into an
      ``elemwise_add``: MXNet 1.9's MKLDNN inference pass then fuses Convolution + BatchNorm + relu into one
      operator that also serves the add, which computes ReLU instead of PReLU (caught by
      tests/test_prelu.py ``test_inference_module_sees_set_params_after_first_forward``);
    * ``Deconvolution`` and not ``Convolution``: the same inference pass fuses 2-D convolutions into operators
      that cache their weight at the first forward, so a weight computed from gamma would never be refreshed (an
      inference Module given new parameters with ``set_params`` would keep the old slopes); deconvolutions are
      not fused.

    Parameters: only ``gamma`` (C,). Returns a Symbol of the shape of ``data``.
    """
    if ndim != 4:
        return _prelu_any_rank(data, gamma, name, num_channels)
    pos = mx.sym.Activation(data=data, act_type="relu", name=name + "_pos")
    ones = mx.sym.ones_like(gamma, name=name + "_ones")
    # `negative`, not `_mul_scalar(-1)`: tools (and eval.import_onnx) read the network's input normalisation from its
    # _minus_scalar/_mul_scalar nodes
    minus_one = mx.sym.negative(ones, name=name + "_minusone")
    # ones_like has no gradient (MXNet registers zero gradients for it), so this weight is a constant; no
    # BlockGrad, which would also be mistaken for an output marker by tools that look for BlockGrad(fc1)
    minus_one = mx.sym.reshape(minus_one, shape=(num_channels, 1, 1, 1), name=name + "_negweight")
    negated = mx.sym.Deconvolution(data=data, weight=minus_one, num_filter=num_channels, num_group=num_channels,
                                   kernel=(1, 1), no_bias=True, name=name + "_negate")
    neg = mx.sym.Activation(data=negated, act_type="relu", name=name + "_negpart")
    weight = mx.sym.negative(gamma, name=name + "_minusgamma")
    weight = mx.sym.reshape(weight, shape=(num_channels, 1, 1, 1), name=name + "_weight")
    scaled = mx.sym.Deconvolution(data=neg, weight=weight, num_filter=num_channels, num_group=num_channels,
                                  kernel=(1, 1), no_bias=True, name=name + "_scale")
    return mx.sym.elemwise_add(pos, scaled, name=name)


def _prelu_any_rank(data, gamma, name, num_channels):
    r"""PReLU for inputs of any rank >= 2: ``relu(x) + gamma * (x - relu(x))``, the product a depthwise 1-D conv.

    .. math:: y = \mathrm{relu}(x) + \mathrm{dwconv}_{1}\big(x - \mathrm{relu}(x),\ \gamma\big)

    where the kernel-1 convolution runs on x reshaped to (B, C, prod(rest)) and its weight is ``gamma``
    reshaped to (C, 1, 1). This was the only PReLU graph of earlier versions; checkpoints holding it load and
    export as before. The convolution is 1-D because MKLDNN's inference subgraph pass leaves 1-D convolutions
    alone (see :func:`fast_prelu`), and ``Flatten`` brings its MKLDNN-layout output back to the default layout
    (adding it to the relu output directly makes MKLDNN's sum primitive fail on mismatched memory descriptors).
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
