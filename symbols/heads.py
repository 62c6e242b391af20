"""Embedding heads ``get_fc1`` (insightface ``symbol_utils.get_fc1``, spec §5.3).

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
"""
import mxnet as mx

from .common import BN_EPS, MXNET_DEFAULT_BN_EPS, act, batchnorm, conv

# Dropout probability of the E/F/Z heads.
HEAD_DROPOUT = 0.4
# GNAP uses a fixed BN momentum of 0.9 regardless of bn_mom (as insightface).
GNAP_BN_MOM = 0.9

FC_TYPES = ("E", "F", "FC", "G", "GAP", "GDC", "GNAP", "H", "I", "J", "Z")


def list_fc_types():
    """Sorted list of valid ``fc_type`` values."""
    return sorted(FC_TYPES)


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
        One of :data:`FC_TYPES` (see the module table).
    in_channels : int
        C_in (needed by GDC's depthwise conv, GNAP and PReLU slopes).
    bn_mom : float
        BatchNorm momentum.
    act_type, fast_prelu : str, bool
        Activation of the GAP head.

    Returns
    -------
    Symbol named ``fc1`` of shape (B, D) (Z: the (B, C_in, 7, 7) map).
    """
    if fc_type not in FC_TYPES:
        raise ValueError(f"get_fc1: unknown fc_type {fc_type!r}; valid types: {list_fc_types()}")
    body = last_conv
    if fc_type in ("E", "F", "G", "I", "FC", "Z", "GAP"):
        body = batchnorm(body, "bn1", bn_mom=bn_mom)
    if fc_type in ("E", "F", "Z"):
        body = mx.sym.Dropout(data=body, p=HEAD_DROPOUT)
    if fc_type == "Z":
        return mx.sym.identity(data=body, name="fc1")
    if fc_type in ("F", "G", "H"):
        return mx.sym.FullyConnected(data=body, num_hidden=num_classes, name="fc1")
    if fc_type == "GAP":
        body = act(body, act_type, "relu1", num_channels=in_channels, fast_prelu=fast_prelu)
        body = mx.sym.Pooling(data=body, global_pool=True, kernel=(7, 7), pool_type="avg", name="pool1")
        body = mx.sym.Flatten(data=body)
    elif fc_type == "GDC":
        body = conv(body, in_channels, (7, 7), (1, 1), (0, 0), name="conv_6dw7_7_conv2d", num_group=in_channels,
                    workspace=workspace)
        body = batchnorm(body, "conv_6dw7_7_batchnorm", bn_mom=bn_mom, eps=MXNET_DEFAULT_BN_EPS)
    elif fc_type == "GNAP":
        return _gnap(body, num_classes, in_channels, act_type, fast_prelu, workspace)
    body = mx.sym.FullyConnected(data=body, num_hidden=num_classes, name="pre_fc1")
    return batchnorm(body, "fc1", bn_mom=bn_mom, eps=BN_EPS, fix_gamma=True)


def _gnap(body, num_classes, in_channels, act_type, fast_prelu, workspace):
    """GNAP head: global norm-aware pooling (spatial re-weighting by mean(||x||)/||x|| per position)."""
    filters_in = in_channels
    if num_classes > filters_in:
        body = conv(body, num_classes, (1, 1), name="convx", workspace=workspace)
        body = batchnorm(body, "convx_bn", bn_mom=GNAP_BN_MOM)
        body = act(body, act_type, "convx_relu", num_channels=num_classes, fast_prelu=fast_prelu)
        filters_in = num_classes
    body = batchnorm(body, "bn6f", bn_mom=GNAP_BN_MOM, fix_gamma=True)
    spatial_norm = mx.sym.sqrt(mx.sym.sum(body * body, axis=1, keepdims=True))
    weight = mx.sym.broadcast_div(mx.sym.mean(spatial_norm), spatial_norm)
    body = mx.sym.broadcast_mul(body, weight)
    body = mx.sym.Pooling(data=body, kernel=(7, 7), global_pool=True, pool_type="avg")
    if num_classes < filters_in:
        body = batchnorm(body, "bn6w", bn_mom=GNAP_BN_MOM, fix_gamma=True)
        body = mx.sym.FullyConnected(data=body, num_hidden=num_classes, name="pre_fc1")
    else:
        body = mx.sym.Flatten(data=body)
    return batchnorm(body, "fc1", bn_mom=GNAP_BN_MOM, fix_gamma=True)
