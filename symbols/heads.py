"""Embedding heads ``get_fc1`` (insightface ``recognition/arcface_mxnet/symbol/symbol_utils.py::get_fc1`` at HEAD
7fadd420; OLD ``src/symbols/symbol_utils.py::get_fc1``).

Every head maps the last feature map (B, C_in, 7, 7) to the embedding ``fc1`` (B, D). Names of the
layers follow insightface (``bn1``, ``pre_fc1``, ``fc1``, ``conv_6dw7_7``, ``bn6f``, ...).

| type | structure |
|------|-----------|
| E    | BN ``bn1`` -> Dropout(0.4) -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1`` (default) |
| Z    | BN ``bn1`` -> Dropout(0.4); the 4-D map is the output (identity named ``fc1``) |
| F    | BN ``bn1`` -> Dropout(0.4) -> FC(D) ``fc1`` |
| G    | BN ``bn1`` -> FC(D) ``fc1`` |
| H    | FC(D) ``fc1`` |
| I, FC| BN ``bn1`` -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1`` |
| J    | FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1`` |
| GAP  | BN ``bn1`` -> Act ``relu1`` -> global avg pool -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1`` |
| GDC  | depthwise 7x7 conv ``conv_6dw7_7`` + BN (eps 1e-3) -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1`` |
| GNAP | [1x1 conv ``convx`` if D > C_in] -> BN ``bn6f`` -> norm re-weighting -> avg pool -> [BN ``bn6w`` + FC
|      | ``pre_fc1`` if D < C_in] -> BN(fix_gamma) ``fc1`` |

Each type is a builder registered in :data:`symbols.registry.FC_TYPES` with ``@register_fc_type(name)``;
:func:`get_fc1` looks it up. Not built: HEAD's ``SFC`` and OLD's ``A``/``B``/``C``/``D`` (+``X``) types.
"""
import mxnet as mx

from .common import BN_EPS, MXNET_DEFAULT_BN_EPS, act, batchnorm, conv
from .registry import FC_TYPES, register_fc_type

# Dropout probability of the E/F/Z heads.
HEAD_DROPOUT = 0.4
# GNAP uses a fixed BN momentum of 0.9 regardless of bn_mom (as insightface).
GNAP_BN_MOM = 0.9


def list_fc_types():
    """Sorted list of valid ``fc_type`` values (the names of :data:`symbols.registry.FC_TYPES`)."""
    return FC_TYPES.names()


def get_fc1(last_conv, num_classes, fc_type="E", in_channels=512, bn_mom=0.9, act_type="prelu",
            fast_prelu=True, workspace=256):
    """Build the embedding head on ``last_conv``.

    Parameters
    ----------
    last_conv : Symbol
        Feature map (B, C_in, 7, 7) for 112x112 input.
    num_classes : int
        D, the embedding size (insightface calls it num_classes here).
    fc_type : str
        A name of :data:`symbols.registry.FC_TYPES` (see the module table).
    in_channels : int
        C_in (needed by GDC's depthwise conv, GNAP and PReLU slopes).
    bn_mom : float
        BatchNorm momentum.
    act_type, fast_prelu : str, bool
        Activation of the GAP/GNAP heads.
    workspace : int
        Convolution workspace (MB).

    Returns
    -------
    Symbol named ``fc1`` of shape (B, D) (Z: the (B, C_in, 7, 7) map).
    """
    if fc_type not in FC_TYPES:
        raise ValueError(f"get_fc1: {FC_TYPES.unknown_message(fc_type)}")
    return FC_TYPES.lookup(fc_type).builder(last_conv, num_classes, in_channels=in_channels, bn_mom=bn_mom,
                                            act_type=act_type, fast_prelu=fast_prelu, workspace=workspace)


def _bn1(body, bn_mom):
    return batchnorm(body, "bn1", bn_mom=bn_mom)


def _pre_fc1_then_fc1(body, emb_size, bn_mom):
    """FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1``: the ending shared by E, I/FC, J, GAP and GDC."""
    body = mx.sym.FullyConnected(data=body, num_hidden=emb_size, name="pre_fc1")
    return batchnorm(body, "fc1", bn_mom=bn_mom, eps=BN_EPS, fix_gamma=True)


@register_fc_type("E")
def fc_e(body, emb_size, bn_mom=0.9, **_):
    """BN ``bn1`` -> Dropout(0.4) -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1`` (insightface's default)."""
    body = mx.sym.Dropout(data=_bn1(body, bn_mom), p=HEAD_DROPOUT)
    return _pre_fc1_then_fc1(body, emb_size, bn_mom)


@register_fc_type("Z")
def fc_z(body, emb_size, bn_mom=0.9, **_):
    """BN ``bn1`` -> Dropout(0.4); the 4-D map is the embedding (identity named ``fc1``)."""
    body = mx.sym.Dropout(data=_bn1(body, bn_mom), p=HEAD_DROPOUT)
    return mx.sym.identity(data=body, name="fc1")


@register_fc_type("F")
def fc_f(body, emb_size, bn_mom=0.9, **_):
    """BN ``bn1`` -> Dropout(0.4) -> FC(D) ``fc1``."""
    body = mx.sym.Dropout(data=_bn1(body, bn_mom), p=HEAD_DROPOUT)
    return mx.sym.FullyConnected(data=body, num_hidden=emb_size, name="fc1")


@register_fc_type("G")
def fc_g(body, emb_size, bn_mom=0.9, **_):
    """BN ``bn1`` -> FC(D) ``fc1``."""
    return mx.sym.FullyConnected(data=_bn1(body, bn_mom), num_hidden=emb_size, name="fc1")


@register_fc_type("H")
def fc_h(body, emb_size, **_):
    """FC(D) ``fc1``."""
    return mx.sym.FullyConnected(data=body, num_hidden=emb_size, name="fc1")


@register_fc_type("FC")
@register_fc_type("I")
def fc_i(body, emb_size, bn_mom=0.9, **_):
    """BN ``bn1`` -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1`` (E without dropout; HEAD's FC is the same)."""
    return _pre_fc1_then_fc1(_bn1(body, bn_mom), emb_size, bn_mom)


@register_fc_type("J")
def fc_j(body, emb_size, bn_mom=0.9, **_):
    """FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1``."""
    return _pre_fc1_then_fc1(body, emb_size, bn_mom)


@register_fc_type("GAP")
def fc_gap(body, emb_size, in_channels=512, bn_mom=0.9, act_type="prelu", fast_prelu=True, **_):
    """BN ``bn1`` -> Act ``relu1`` -> global avg pool -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1``."""
    body = act(_bn1(body, bn_mom), act_type, "relu1", num_channels=in_channels, fast_prelu=fast_prelu)
    body = mx.sym.Pooling(data=body, global_pool=True, kernel=(7, 7), pool_type="avg", name="pool1")
    return _pre_fc1_then_fc1(mx.sym.Flatten(data=body), emb_size, bn_mom)


@register_fc_type("GDC")
def fc_gdc(body, emb_size, in_channels=512, bn_mom=0.9, workspace=256, **_):
    """Depthwise 7x7 conv ``conv_6dw7_7`` + BN (eps 1e-3) -> FC(D) ``pre_fc1`` -> BN(fix_gamma) ``fc1``."""
    body = conv(body, in_channels, (7, 7), (1, 1), (0, 0), name="conv_6dw7_7_conv2d", num_group=in_channels,
                workspace=workspace)
    body = batchnorm(body, "conv_6dw7_7_batchnorm", bn_mom=bn_mom, eps=MXNET_DEFAULT_BN_EPS)
    return _pre_fc1_then_fc1(body, emb_size, bn_mom)


@register_fc_type("GNAP")
def fc_gnap(body, emb_size, in_channels=512, act_type="prelu", fast_prelu=True, workspace=256, **_):
    """GNAP head: global norm-aware pooling (spatial re-weighting by mean(||x||)/||x|| per position).

    BN momentum is fixed at 0.9 whatever ``bn_mom`` is (as insightface).
    """
    filters_in = in_channels
    if emb_size > filters_in:
        body = conv(body, emb_size, (1, 1), name="convx", workspace=workspace)
        body = batchnorm(body, "convx_bn", bn_mom=GNAP_BN_MOM)
        body = act(body, act_type, "convx_relu", num_channels=emb_size, fast_prelu=fast_prelu)
        filters_in = emb_size
    body = batchnorm(body, "bn6f", bn_mom=GNAP_BN_MOM, fix_gamma=True)
    spatial_norm = mx.sym.sqrt(mx.sym.sum(body * body, axis=1, keepdims=True))
    weight = mx.sym.broadcast_div(mx.sym.mean(spatial_norm), spatial_norm)
    body = mx.sym.broadcast_mul(body, weight)
    body = mx.sym.Pooling(data=body, kernel=(7, 7), global_pool=True, pool_type="avg")
    if emb_size < filters_in:
        body = batchnorm(body, "bn6w", bn_mom=GNAP_BN_MOM, fix_gamma=True)
        body = mx.sym.FullyConnected(data=body, num_hidden=emb_size, name="pre_fc1")
    else:
        body = mx.sym.Flatten(data=body)
    return batchnorm(body, "fc1", bn_mom=GNAP_BN_MOM, fix_gamma=True)
