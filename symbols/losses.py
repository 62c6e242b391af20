"""Loss heads: softmax, the margin-softmax family, ArcFace OLD type 4, triplet/atriplet.

Sources: insightface HEAD 7fadd420 ``recognition/arcface_mxnet/train.py`` (``get_symbol``, ``margin_softmax``)
and ``recognition/arcface_mxnet/sample_config.py`` (``loss.*`` presets); OLD ``src/train_softmax.py``
(``--loss-type`` 0..5) and ``src/train_triplet.py`` (triplet / atriplet) at 0972924a.

Margin softmax (insightface HEAD ``margin_softmax``, OLD ``--loss-type 5``), with
W_n = row-L2-normalised ``fc7_weight`` (C, D) and x_n = L2-normalised embedding:

.. math::

    z_j = s \\cos\\theta_j = s\\, x_n \\cdot W_{n,j}, \\qquad
    z_y \\leftarrow s\\,(\\cos(m_1 \\theta_y + m_2) - m_3)

Only the target logit changes; the others stay s·cosθ_j. Every head is registered in
:data:`symbols.registry.HEADS` by one ``@register_head(name, preset=...)`` below; :data:`HEAD_PRESETS` is a live
view of the registered presets:

| head        | s  | m1  | m2  | m3   | notes |
|-------------|----|-----|-----|------|-------|
| softmax     | -  | -   | -   | -    | plain FC ``fc7`` (+ ``fc7_bias`` lr x2 / wd x0 unless fc7_no_bias) |
| nsoftmax    | 64 | 1   | 0   | 0    | normalised weights and features, scale only |
| arcface     | 64 | 1   | 0.5 | 0    | HEAD s·cos(θ+m2), no θ+m>π fallback |
| arcface_v1  | 64 | 1   | 0.5 | 0    | OLD type 4: s·(cosθ − m·sin m) where θ+m ≥ π; easy_margin |
| cosface     | 64 | 1   | 0   | 0.35 | z_y − s·m3 (no arccos) |
| sphereface  | 64 | 1.5 | 0   | 0    | cos(m1·θ) in the combined form (no ψ piecewise, no λ) |
| combined    | 64 | 1   | 0.3 | 0.2  | |
| triplet     | α = 0.3 | | | | mean relu(‖a−p‖² − ‖a−n‖² + α) |
| atriplet    | α = 0.35 | | | | mean relu(acos(a·p) − acos(a·n) + α) |

Deliberate fix: cosθ is clipped to [−1 + 1e-7, 1 − 1e-7] before arccos / sqrt(1 − cos²), whose
derivatives are infinite at ±1 (upstream can produce NaN there); the change in value is < 1e-6·s.
"""
import logging
import math

import mxnet as mx

from .registry import HEADS, PresetsView, register_head

logger = logging.getLogger(__name__)

# Clip of cos(theta) before arccos / sqrt(1 - cos^2): keeps their derivatives finite.
COS_CLIP_EPS = 1e-7
# HEAD gives fc7_weight a Normal(0.01) initialiser (OLD: the global Xavier).
FC7_INIT_SIGMA = 0.01
# insightface's fc7_bias multipliers (ignored by its optimiser, which is built without sym= / param_idx2name:
# HEAD recognition/arcface_mxnet/train.py ``opt = optimizer.SGD(...)``).
FC7_BIAS_LR_MULT = 2.0
FC7_BIAS_WD_MULT = 0.0

# name -> config keys the head's preset sets (HEAD sample_config.py ``loss.*``; arcface_v1/sphereface added):
# a live view of the registry, so a head registered elsewhere appears here too.
HEAD_PRESETS = PresetsView(HEADS)


def _heads_where(predicate):
    return tuple(name for name in HEADS.names() if predicate(HEADS.lookup(name)))


def __getattr__(name):
    """Former tuples of head names, now computed from the registry (``TRIPLET_HEADS``, ``SOFTMAX_HEADS``)."""
    if name == "TRIPLET_HEADS":
        return _heads_where(lambda entry: entry.is_triplet)
    if name == "SOFTMAX_HEADS":
        return _heads_where(lambda entry: not entry.is_triplet)
    if name == "MARGIN_HEADS":
        return _heads_where(lambda entry: not entry.is_triplet and entry.name != "softmax")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# OLD ``--loss-type N`` -> head name and where each head key comes from: a float is a constant, a str names
# the OLD flag (``margin_s``/``margin_m``/``margin_a``/``margin_b``/``easy_margin``) that supplies it.
# Type 1 (A-Softmax via the LSoftmax op of insightface's MXNet fork, absent from stock MXNet, margin 4 with
# lambda annealing) maps to the combined-form SphereFace preset m1 = 1.5: a substitute, not the same op.
# Types 3, 6, 7 (experimental cos(m·θ), intra/inter losses) are not provided.
LEGACY_LOSS_TYPES = {
    0: {"loss": "softmax"},
    1: {"loss": "sphereface", "loss_s": "margin_s", "loss_m1": 1.5, "loss_m2": 0.0, "loss_m3": 0.0},
    2: {"loss": "cosface", "loss_s": "margin_s", "loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": "margin_m"},
    4: {"loss": "arcface_v1", "loss_s": "margin_s", "loss_m1": 1.0, "loss_m2": "margin_m", "loss_m3": 0.0,
        "easy_margin": "easy_margin"},
    5: {"loss": "combined", "loss_s": "margin_s", "loss_m1": "margin_a", "loss_m2": "margin_m",
        "loss_m3": "margin_b"},
}
# OLD train_triplet ``--loss-type``: 1 triplet, 2 atriplet.
LEGACY_TRIPLET_LOSS_TYPES = {1: "triplet", 2: "atriplet"}


def list_heads():
    """Sorted list of valid ``loss`` names (the names of :data:`symbols.registry.HEADS`)."""
    return HEADS.names()


def check_head(name):
    """Raise ValueError listing the valid heads (and the closest one) when ``name`` is not one."""
    HEADS.lookup(name)


def legacy_loss_config(loss_type, margin_s=64.0, margin_m=0.5, margin_a=1.0, margin_b=0.0, easy_margin=0):
    """Translate OLD ``train_softmax --loss-type N`` and its margin flags into HEAD config keys.

    Returns
    -------
    dict with ``loss`` and the ``loss_s/loss_m1/loss_m2/loss_m3`` (and ``easy_margin``) it implies, e.g.
    ``legacy_loss_config(4, margin_m=0.5)`` -> ``{'loss': 'arcface_v1', 'loss_s': 64.0, 'loss_m1': 1.0,
    'loss_m2': 0.5, 'loss_m3': 0.0, 'easy_margin': 0}``.
    """
    if loss_type not in LEGACY_LOSS_TYPES:
        raise ValueError(f"--loss-type {loss_type!r} is not supported; valid: {sorted(LEGACY_LOSS_TYPES)} "
                         "(0 softmax, 1 sphereface (combined m1 = 1.5), 2 cosface, 4 arcface_v1, 5 combined)")
    flags = {"margin_s": margin_s, "margin_m": margin_m, "margin_a": margin_a, "margin_b": margin_b,
             "easy_margin": easy_margin}
    out = {}
    for key, source in LEGACY_LOSS_TYPES[loss_type].items():
        out[key] = flags[source] if isinstance(source, str) and key != "loss" else source
    return out


def fc7_weight_variable(num_classes, emb_size, lr_mult=1.0, wd_mult=1.0):
    """``fc7_weight`` (C, D) with insightface HEAD's attributes (lr_mult, wd_mult, Normal(0.01) init)."""
    return mx.sym.Variable("fc7_weight", shape=(num_classes, emb_size), lr_mult=lr_mult, wd_mult=wd_mult,
                           init=mx.init.Normal(FC7_INIT_SIGMA))


def softmax_logits(embedding, num_classes, weight, no_bias=False):
    """Plain softmax classifier ``fc7 = x W^T (+ b)``; bias ``fc7_bias`` lr_mult 2, wd_mult 0 (insightface)."""
    if no_bias:
        return mx.sym.FullyConnected(data=embedding, weight=weight, no_bias=True, num_hidden=num_classes, name="fc7")
    bias = mx.sym.Variable("fc7_bias", lr_mult=FC7_BIAS_LR_MULT, wd_mult=FC7_BIAS_WD_MULT)
    return mx.sym.FullyConnected(data=embedding, weight=weight, bias=bias, num_hidden=num_classes, name="fc7")


def cosine_logits(embedding, num_classes, weight, s):
    """``s * cos(theta_j)`` (B, C): FC of the L2-normalised embedding (x s) and L2-normalised weight rows."""
    weight_n = mx.sym.L2Normalization(weight, mode="instance", name="fc7_weight_n")
    emb_n = mx.sym.L2Normalization(embedding, mode="instance", name="fc1n") * s
    return mx.sym.FullyConnected(data=emb_n, weight=weight_n, no_bias=True, num_hidden=num_classes, name="fc7_cos")


def _replace_target(cos_logits, label, num_classes, new_zy, zy, dtype):
    """fc7 = cos_logits + onehot(label) * (new_zy - zy): only the target logit changes."""
    diff = mx.sym.expand_dims(new_zy - zy, axis=1)
    onehot = mx.sym.one_hot(label, depth=num_classes, on_value=1.0, off_value=0.0, dtype=dtype)
    return mx.sym.elemwise_add(cos_logits, mx.sym.broadcast_mul(onehot, diff), name="fc7")


def _clipped_cos(zy, s):
    return mx.sym.clip(zy / s, -1.0 + COS_CLIP_EPS, 1.0 - COS_CLIP_EPS)


def margin_softmax_logits(embedding, label, num_classes, weight, s=64.0, m1=1.0, m2=0.5, m3=0.0, dtype="float32"):
    """Combined-margin logits (HEAD ``margin_softmax``), named ``fc7``.

    .. math:: z_j = s\\cos\\theta_j\\ (j \\ne y), \\qquad z_y = s(\\cos(m_1\\theta_y + m_2) - m_3)

    (1, 0, 0) leaves the cosine logits unchanged (nsoftmax); m1 == 1 and m2 == 0 subtracts s·m3 directly
    (CosFace, no arccos); otherwise θ = arccos(clip(cosθ)), exactly as HEAD (no θ+m>π fallback).

    Inputs: ``embedding`` (B, D), ``label`` (B,) class ids, ``weight`` (C, D). Output (B, C).
    ``dtype`` is the float type of the graph (the one-hot masks are created in it).
    """
    if s <= 0:
        raise ValueError(f"margin softmax: loss_s={s!r} must be > 0")
    fc7 = cosine_logits(embedding, num_classes, weight, s)
    if m1 == 1.0 and m2 == 0.0 and m3 == 0.0:
        return mx.sym.identity(fc7, name="fc7")
    if m1 == 1.0 and m2 == 0.0:
        onehot = mx.sym.one_hot(label, depth=num_classes, on_value=s * m3, off_value=0.0, dtype=dtype)
        return mx.sym.elemwise_sub(fc7, onehot, name="fc7")
    zy = mx.sym.pick(fc7, label, axis=1)
    theta = mx.sym.arccos(_clipped_cos(zy, s))
    if m1 != 1.0:
        theta = theta * m1
    if m2 > 0.0:
        theta = theta + m2
    body = mx.sym.cos(theta)
    if m3 > 0.0:
        body = body - m3
    return _replace_target(fc7, label, num_classes, body * s, zy, dtype)


def arcface_v1_logits(embedding, label, num_classes, weight, s=64.0, m=0.5, easy_margin=0, dtype="float32"):
    """ArcFace with insightface OLD ``--loss-type 4``'s fallback, named ``fc7``.

    .. math::

        z_y = \\begin{cases} s\\cos(\\theta + m) & \\text{if } \\cos\\theta > \\cos(\\pi - m) \\\\
                              s(\\cos\\theta - m\\sin m) & \\text{otherwise} \\end{cases}

    With ``easy_margin`` the margin applies only where cosθ > 0 and z_y = s·cosθ elsewhere. The fallback keeps
    the target logit monotonic in θ (cos(θ+m) turns back up once θ + m > π).
    """
    if s <= 0:
        raise ValueError(f"arcface_v1: loss_s={s!r} must be > 0")
    if not 0.0 <= m < math.pi / 2:
        raise ValueError(f"arcface_v1: margin m={m!r} must satisfy 0 <= m < pi/2")
    cos_m, sin_m = math.cos(m), math.sin(m)
    mm = math.sin(math.pi - m) * m
    threshold = math.cos(math.pi - m)
    fc7 = cosine_logits(embedding, num_classes, weight, s)
    zy = mx.sym.pick(fc7, label, axis=1)
    cos_t = zy / s
    if easy_margin:
        cond = mx.sym.Activation(data=cos_t, act_type="relu")
    else:
        cond = mx.sym.Activation(data=cos_t - threshold, act_type="relu")
    clipped = _clipped_cos(zy, s)
    sin_t = mx.sym.sqrt(1.0 - clipped * clipped)
    new_zy = (cos_t * cos_m - sin_t * sin_m) * s
    zy_keep = zy if easy_margin else zy - s * mm
    new_zy = mx.sym.where(cond, new_zy, zy_keep)
    return _replace_target(fc7, label, num_classes, new_zy, zy, dtype)


def head_logits(embedding, label, head, num_classes, emb_size, s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=0,
                fc7_no_bias=False, fc7_lr_mult=1.0, fc7_wd_mult=1.0, dtype="float32"):
    """Classifier logits ``fc7`` (B, C) of a softmax-family head; creates ``fc7_weight`` (C, D).

    ``head`` is a name of :data:`symbols.registry.HEADS`; its ``logits`` builder receives every margin
    keyword. ``arcface_v1`` uses m = m2 and requires m1 == 1 and m3 == 0. ``dtype``: float type of the graph.
    """
    entry = HEADS.lookup(head)
    if entry.is_triplet:
        raise ValueError(f"head_logits: {head!r} is a triplet head and has no classifier logits")
    weight = fc7_weight_variable(num_classes, emb_size, fc7_lr_mult, fc7_wd_mult)
    return entry.logits(embedding, label, num_classes, weight, s=s, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin,
                        fc7_no_bias=fc7_no_bias, dtype=dtype)


# ----------------------------------------------------------------------------- the registered heads
@register_head("softmax", preset={"loss_s": 64.0, "loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": 0.0})
def softmax_head(embedding, label, num_classes, weight, fc7_no_bias=False, **_):
    """Plain FC classifier (OLD ``--loss-type 0``, HEAD ``loss.softmax``)."""
    return softmax_logits(embedding, num_classes, weight, no_bias=fc7_no_bias)


def _margin_head(embedding, label, num_classes, weight, s=64.0, m1=1.0, m2=0.5, m3=0.0, dtype="float32", **_):
    return margin_softmax_logits(embedding, label, num_classes, weight, s=s, m1=m1, m2=m2, m3=m3, dtype=dtype)


# HEAD margin_softmax with the preset margins of sample_config.py (sphereface: combined-form substitute of OLD
# type 1's LSoftmax operator). One decorator per name: the builder is shared.
register_head("nsoftmax", preset={"loss_s": 64.0, "loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": 0.0})(_margin_head)
register_head("arcface", preset={"loss_s": 64.0, "loss_m1": 1.0, "loss_m2": 0.5, "loss_m3": 0.0})(_margin_head)
register_head("cosface", preset={"loss_s": 64.0, "loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": 0.35})(_margin_head)
register_head("sphereface", preset={"loss_s": 64.0, "loss_m1": 1.5, "loss_m2": 0.0, "loss_m3": 0.0})(_margin_head)
register_head("combined", preset={"loss_s": 64.0, "loss_m1": 1.0, "loss_m2": 0.3, "loss_m3": 0.2})(_margin_head)


@register_head("arcface_v1", preset={"loss_s": 64.0, "loss_m1": 1.0, "loss_m2": 0.5, "loss_m3": 0.0, "easy_margin": 0})
def arcface_v1_head(embedding, label, num_classes, weight, s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=0,
                    dtype="float32", **_):
    """OLD ``--loss-type 4``: ArcFace with the θ+m>π fallback and easy_margin; the margin is ``loss_m2``."""
    if m1 != 1.0 or m3 != 0.0:
        raise ValueError(f"arcface_v1 takes its margin from loss_m2 only; got loss_m1={m1}, loss_m3={m3} "
                         "(use loss 'combined' for m1/m3 margins)")
    return arcface_v1_logits(embedding, label, num_classes, weight, s=s, m=m2, easy_margin=easy_margin, dtype=dtype)


def ce_loss(logits, label, num_classes, per_batch_size):
    """Mean cross entropy of ``logits`` (B, C) for display, computed stably.

    .. math:: \\mathrm{ce} = -\\frac{1}{b}\\sum_i \\log\\mathrm{softmax}(z_i)_{y_i}

    insightface computes ``sum(log(SoftmaxActivation(fc7)) * one_hot(label, on=-1)) / per_batch_size``, which
    is -inf once a probability underflows; ``log_softmax`` is finite. Labels outside [0, C) contribute 0, as
    upstream (one_hot gives an all-zero row). Output shape (1,).
    """
    onehot = mx.sym.one_hot(label, depth=num_classes, on_value=-1.0, off_value=0.0)
    body = mx.sym.log_softmax(logits, axis=-1) * onehot
    return mx.sym.sum(body, name="ce_loss_sum") / float(per_batch_size)


def triplet_loss(embedding, per_batch_size, alpha, angular=False):
    """Triplet loss on one device's batch laid out [anchors | positives | negatives] (b/3 rows each).

    .. math::

        \\text{triplet: } L = \\frac{1}{T}\\sum_t \\max(0, \\|a_t - p_t\\|^2 - \\|a_t - n_t\\|^2 + \\alpha)

        \\text{atriplet: } L = \\frac{1}{T}\\sum_t \\max(0, \\arccos(a_t\\cdot p_t) - \\arccos(a_t\\cdot n_t) + \\alpha)

    on L2-normalised embeddings (``fc1n``), T = b/3. The dot products are clipped before arccos (finite
    gradient for identical embeddings; upstream gives NaN). Output shape (1,) (a mean).
    """
    if per_batch_size <= 0 or per_batch_size % 3 != 0:
        raise ValueError(f"triplet loss: per_batch_size={per_batch_size} must be a positive multiple of 3 "
                         "(each device slice is [anchors | positives | negatives]); e.g. use "
                         f"{max(3, per_batch_size - per_batch_size % 3)}")
    third = per_batch_size // 3
    emb_n = mx.sym.L2Normalization(embedding, mode="instance", name="fc1n")
    anchor = mx.sym.slice_axis(emb_n, axis=0, begin=0, end=third)
    positive = mx.sym.slice_axis(emb_n, axis=0, begin=third, end=2 * third)
    negative = mx.sym.slice_axis(emb_n, axis=0, begin=2 * third, end=3 * third)
    if angular:
        lo, hi = -1.0 + COS_CLIP_EPS, 1.0 - COS_CLIP_EPS
        ap = mx.sym.arccos(mx.sym.clip(mx.sym.sum(anchor * positive, axis=1), lo, hi))
        an = mx.sym.arccos(mx.sym.clip(mx.sym.sum(anchor * negative, axis=1), lo, hi))
    else:
        ap = mx.sym.sum(mx.sym.square(anchor - positive), axis=1)
        an = mx.sym.sum(mx.sym.square(anchor - negative), axis=1)
    loss = mx.sym.Activation(data=ap - an + alpha, act_type="relu")
    return mx.sym.mean(loss)


@register_head("triplet", preset={"triplet_alpha": 0.3}, triplet=True)
def triplet_head(embedding, per_batch_size, alpha):
    """Squared-L2 triplet loss (OLD train_triplet ``--loss-type 1``, HEAD ``loss.triplet``)."""
    return triplet_loss(embedding, per_batch_size, alpha, angular=False)


@register_head("atriplet", preset={"triplet_alpha": 0.35}, triplet=True)
def atriplet_head(embedding, per_batch_size, alpha):
    """Angular triplet loss (OLD train_triplet ``--loss-type 2``, HEAD ``loss.atriplet``)."""
    return triplet_loss(embedding, per_batch_size, alpha, angular=True)
