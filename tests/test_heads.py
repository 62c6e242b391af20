"""Loss heads vs independent numpy per-sample formulas, gradients, triplet, get_symbol wiring.

Formulas: insightface HEAD 7fadd420 recognition/arcface_mxnet/train.py (margin_softmax, triplet/atriplet) and OLD
src/train_softmax.py --loss-type 4 (0972924a); presets from HEAD recognition/arcface_mxnet/sample_config.py.
"""
import json
import math

import mxnet as mx
import numpy as np
import pytest

import symbols
from symbols import losses

C, D, B = 5, 4, 6


# ----------------------------------------------------------------------------- numpy references
def np_target_logit(head, cos_t, s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=0):
    """Target logit of one sample from its cos(theta), written from the papers' / upstream formulas."""
    theta = math.acos(cos_t)
    if head == "nsoftmax":
        return s * cos_t
    if head == "cosface":
        return s * (cos_t - m3)
    if head in ("arcface", "combined", "sphereface"):
        return s * (math.cos(m1 * theta + m2) - m3)
    if head == "arcface_v1":
        m = m2
        if easy_margin:
            return s * math.cos(theta + m) if cos_t > 0 else s * cos_t
        if theta + m < math.pi:
            return s * math.cos(theta + m)
        return s * (cos_t - m * math.sin(m))
    raise AssertionError(head)


def np_logits(head, x, w, labels, **margins):
    """Per-sample loop: s*cos for every class, target replaced by np_target_logit."""
    s = margins.get("s", 64.0)
    out = np.zeros((x.shape[0], w.shape[0]))
    for i in range(x.shape[0]):
        xn = x[i] / np.linalg.norm(x[i])
        for j in range(w.shape[0]):
            cos_t = float(xn @ (w[j] / np.linalg.norm(w[j])))
            out[i, j] = np_target_logit(head, cos_t, **margins) if j == labels[i] else s * cos_t
    return out


HEAD_MARGINS = {
    "nsoftmax": dict(s=64.0, m1=1.0, m2=0.0, m3=0.0),
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "arcface_v1": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(s=64.0, m1=1.5, m2=0.0, m3=0.0),
    "combined": dict(s=64.0, m1=1.0, m2=0.3, m3=0.2),
}


def logits_symbol(head, num_classes=C, emb_size=D, dtype="float32", easy_margin=0, **margins):
    data = mx.sym.Variable("data")
    label = mx.sym.Variable("softmax_label")
    return losses.head_logits(data, label, head, num_classes, emb_size, easy_margin=easy_margin, dtype=dtype,
                              **margins)


def forward(sym, **arrays):
    args = {k: mx.nd.array(v, dtype=v.dtype) for k, v in arrays.items() if k in sym.list_arguments()}
    ex = sym.bind(mx.cpu(), args)
    ex.forward(is_train=False)
    return ex.outputs[0].asnumpy()


def vectors_with_cos(cos_values):
    """2-D embedding (1, 0) per sample and a weight row at angle acos(c) for the target class 0."""
    x = np.tile(np.array([[1.0, 0.0]]), (len(cos_values), 1))
    w = np.array([[c, math.sqrt(1.0 - c * c)] for c in cos_values])
    return x, w


# ----------------------------------------------------------------------------- hand-computed reference vectors
REFERENCE_LOGITS = {  # cos_t 0.5, 0.0, -0.9, 0.99 at s=64
    "nsoftmax": [32.0, 0.0, -57.6, 63.36],
    "arcface": [1.5102, -30.6832, -63.9233, 51.2752],
    "arcface_v1": [1.5102, -30.6832, -72.9416, 51.2752],
    "cosface": [9.6, -22.4, -80.0, 40.96],
    "combined": [1.3914, -31.7133, -76.0715, 45.0621],
    "sphereface": [0.0, -45.2548, -40.0703, 62.563],
}


@pytest.mark.parametrize("head", sorted(REFERENCE_LOGITS))
def test_reference_target_logits(head):
    cos_values = [0.5, 0.0, -0.9, 0.99]
    for cos_t, expected in zip(cos_values, REFERENCE_LOGITS[head]):
        x, w = vectors_with_cos([cos_t])
        sym = logits_symbol(head, num_classes=1, emb_size=2, **HEAD_MARGINS[head])
        got = forward(sym, data=x.astype(np.float32), fc7_weight=w.astype(np.float32),
                      softmax_label=np.zeros(1, np.float32))[0, 0]
        assert got == pytest.approx(expected, abs=2e-3), (head, cos_t)
        assert got == pytest.approx(np_target_logit(head, cos_t, **HEAD_MARGINS[head]), abs=2e-3)


def test_arcface_v1_both_sides_of_threshold():
    """theta + m < pi uses s*cos(theta+m); beyond it s*(cos - m sin m); HEAD arcface never falls back."""
    threshold = math.cos(math.pi - 0.5)  # -0.8775826
    for cos_t in (threshold + 0.01, threshold - 0.01):
        x, w = vectors_with_cos([cos_t])
        arrays = dict(data=x.astype(np.float32), fc7_weight=w.astype(np.float32),
                      softmax_label=np.zeros(1, np.float32))
        v1 = forward(logits_symbol("arcface_v1", num_classes=1, emb_size=2, s=64.0, m2=0.5), **arrays)[0, 0]
        head = forward(logits_symbol("arcface", num_classes=1, emb_size=2, s=64.0, m2=0.5), **arrays)[0, 0]
        theta = math.acos(cos_t)
        assert head == pytest.approx(64 * math.cos(theta + 0.5), abs=2e-3)
        if cos_t > threshold:
            assert v1 == pytest.approx(64 * math.cos(theta + 0.5), abs=2e-3)
        else:
            assert v1 == pytest.approx(64 * (cos_t - 0.5 * math.sin(0.5)), abs=2e-3)
            assert v1 != pytest.approx(head, abs=1.0)


def test_arcface_v1_easy_margin():
    """easy_margin: margin only where cos > 0; cos <= 0 (incl. exactly 0) keeps s*cos."""
    cos_values = [0.5, 0.0, -0.3, -0.9]
    expected = [64 * math.cos(math.acos(0.5) + 0.5), 0.0, 64 * -0.3, 64 * -0.9]
    x, w = vectors_with_cos(cos_values)
    # one class per sample: sample i's target is row i
    sym = logits_symbol("arcface_v1", num_classes=4, emb_size=2, s=64.0, m2=0.5, easy_margin=1)
    got = forward(sym, data=x.astype(np.float32), fc7_weight=w.astype(np.float32),
                  softmax_label=np.arange(4, dtype=np.float32))
    np.testing.assert_allclose(np.diag(got), expected, atol=2e-3)
    np.testing.assert_allclose(np.diag(got), [np_target_logit("arcface_v1", c, easy_margin=1) for c in cos_values],
                               atol=2e-3)


@pytest.mark.parametrize("head", sorted(HEAD_MARGINS))
def test_logits_match_numpy_per_sample(head):
    """Random embeddings/weights: target logits follow the head formula, others stay s*cos."""
    rng = np.random.RandomState(0)
    x = rng.randn(B, D)
    w = rng.randn(C, D)
    labels = rng.randint(0, C, size=B)
    sym = logits_symbol(head, **HEAD_MARGINS[head])
    got = forward(sym, data=x.astype(np.float32), fc7_weight=w.astype(np.float32),
                  softmax_label=labels.astype(np.float32))
    np.testing.assert_allclose(got, np_logits(head, x, w, labels, **HEAD_MARGINS[head]), atol=2e-3, rtol=1e-4)


def test_softmax_head_with_and_without_bias():
    rng = np.random.RandomState(1)
    x, w, bias = rng.randn(B, D), rng.randn(C, D), rng.randn(C)
    labels = rng.randint(0, C, size=B).astype(np.float32)
    with_bias = logits_symbol("softmax")
    assert with_bias.list_arguments() == ["data", "fc7_weight", "fc7_bias"]
    got = forward(with_bias, data=x, fc7_weight=w, fc7_bias=bias)
    np.testing.assert_allclose(got, x @ w.T + bias, rtol=1e-5, atol=1e-5)
    no_bias = logits_symbol("softmax", fc7_no_bias=True)
    assert no_bias.list_arguments() == ["data", "fc7_weight"]
    np.testing.assert_allclose(forward(no_bias, data=x, fc7_weight=w), x @ w.T, rtol=1e-5, atol=1e-5)
    attrs = with_bias.attr_dict()["fc7_bias"]
    assert float(attrs["__lr_mult__"]) == 2.0 and float(attrs["__wd_mult__"]) == 0.0
    _ = labels


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("head", ["softmax"] + sorted(HEAD_MARGINS))
def test_numeric_gradient_float64(head):
    """Logits sub-graph (before SoftmaxOutput) vs finite differences, float64; s = 8 for conditioning."""
    rng = np.random.RandomState(2)
    margins = dict(HEAD_MARGINS.get(head, {}))
    if margins:
        margins["s"] = 8.0
    x = rng.randn(4, D)
    w = rng.randn(C, D)
    labels = np.array([0, 1, 2, 3], dtype=np.float64)
    sym = logits_symbol(head, dtype="float64", fc7_no_bias=True, **margins)
    location = {"data": x, "fc7_weight": w, "softmax_label": labels}
    location = {k: v for k, v in location.items() if k in sym.list_arguments()}
    mx.test_utils.check_numeric_gradient(sym, location, grad_nodes=["data", "fc7_weight"], numeric_eps=1e-6,
                                         rtol=1e-4, atol=1e-6, dtype=np.float64)


@pytest.mark.parametrize("head", ["arcface", "arcface_v1", "sphereface", "combined"])
def test_gradient_finite_at_cos_one(head):
    """Embedding equal to its class weight (cos = 1): arccos/sqrt are clipped, so gradients stay finite."""
    w = np.random.RandomState(3).randn(C, D).astype(np.float32)
    x = w[[0, 1]].copy()
    labels = np.array([0, 1], np.float32)
    sym = mx.sym.make_loss(mx.sym.sum(logits_symbol(head, **HEAD_MARGINS[head])))
    args = {"data": mx.nd.array(x), "fc7_weight": mx.nd.array(w), "softmax_label": mx.nd.array(labels)}
    args = {k: v for k, v in args.items() if k in sym.list_arguments()}
    grads = {"data": mx.nd.zeros(x.shape), "fc7_weight": mx.nd.zeros(w.shape)}
    ex = sym.bind(mx.cpu(), args, args_grad=grads)
    ex.forward(is_train=True)
    ex.backward()
    assert np.isfinite(ex.outputs[0].asnumpy()).all()
    assert np.isfinite(grads["data"].asnumpy()).all() and np.isfinite(grads["fc7_weight"].asnumpy()).all()


# ----------------------------------------------------------------------------- ce_loss
def test_ce_loss_matches_numpy_and_is_stable():
    logits = mx.sym.Variable("logits")
    label = mx.sym.Variable("label")
    sym = losses.ce_loss(logits, label, num_classes=3, per_batch_size=2)
    z = np.array([[1.0, 2.0, 0.5], [0.1, -0.3, 2.0]], np.float32)
    y = np.array([1, 0], np.float32)
    ref = -np.mean([z[i, int(y[i])] - np.log(np.exp(z[i]).sum()) for i in range(2)])
    assert forward(sym, logits=z, label=y)[0] == pytest.approx(ref, rel=1e-5)
    # log(softmax) of the 1000-apart row underflows to -inf; log_softmax stays exact.
    z_far = np.array([[1000.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    y_far = np.array([1, 1], np.float32)
    got = forward(sym, logits=z_far, label=y_far)[0]
    ref_far = (1000.0 + (np.log(2.0 + np.e) - 1.0)) / 2
    assert np.isfinite(got) and got == pytest.approx(ref_far, rel=1e-5)


# ----------------------------------------------------------------------------- triplet
def triplet_forward(points, alpha, angular):
    data = mx.sym.Variable("data")
    sym = losses.triplet_loss(data, per_batch_size=len(points), alpha=alpha, angular=angular)
    return float(forward(sym, data=np.asarray(points, np.float32))[0])


def unit(angle, r=1.0):
    return [r * math.cos(angle), r * math.sin(angle)]


def test_triplet_hand_picked_points():
    # rows: [a1, a2 | p1, p2 | n1, n2]; norms != 1 on purpose (the loss normalises).
    # t1: ap = |(1,0)-(0,1)|^2 = 2, an = |(1,0)-(-1,0)|^2 = 4 -> relu(2 - 4 + 0.3) = 0
    # t2: ap = 4, an = 2 -> relu(4 - 2 + 0.3) = 2.3; mean = 1.15
    points = [[2, 0], [1, 0], [0, 3], [-5, 0], [-1, 0], [0, 0.5]]
    assert triplet_forward(points, 0.3, angular=False) == pytest.approx(1.15, abs=1e-5)


def test_atriplet_hand_picked_points():
    # t1: acos(a.p) = 0.5, acos(a.n) = 1.0 -> relu(0.5 - 1.0 + 0.35) = 0
    # t2: 1.2 - 0.3 + 0.35 = 1.25; mean = 0.625
    points = [unit(0.0, 2), unit(0.0), unit(0.5, 3), unit(1.2), unit(1.0), unit(0.3, 0.5)]
    assert triplet_forward(points, 0.35, angular=True) == pytest.approx(0.625, abs=1e-5)


@pytest.mark.parametrize("angular", [False, True])
def test_triplet_numeric_gradient(angular):
    data = mx.sym.Variable("data")
    sym = losses.triplet_loss(data, per_batch_size=6, alpha=0.5, angular=angular)
    points = np.random.RandomState(4).randn(6, 3)
    mx.test_utils.check_numeric_gradient(sym, {"data": points}, numeric_eps=1e-6, rtol=1e-4, atol=1e-6,
                                         dtype=np.float64)


def test_triplet_batch_not_divisible_by_3():
    with pytest.raises(ValueError, match="multiple of 3"):
        symbols.get_symbol({"network": "r18", "loss": "triplet", "per_batch_size": 64, "net_multiplier": 0.25})


# ----------------------------------------------------------------------------- get_symbol wiring
TINY = {"network": "r18", "net_multiplier": 0.125, "emb_size": 8, "num_classes": C, "per_batch_size": 2}


def _nodes(sym):
    return json.loads(sym.tojson())["nodes"]


def test_get_symbol_softmax_family_outputs_and_attrs():
    sym = symbols.get_symbol({**TINY, "loss": "arcface", "fc7_lr_mult": 2.0, "fc7_wd_mult": 10.0})
    assert len(sym.list_outputs()) == 3
    assert sym.list_outputs()[1] == "softmax_output"
    assert "softmax_label" in sym.list_arguments()
    _, out_shapes, _ = sym.infer_shape(data=(2, 3, 112, 112), softmax_label=(2,))
    assert out_shapes == [(2, 8), (2, C), (1,)]
    attrs = sym.attr_dict()["fc7_weight"]
    assert float(attrs["__lr_mult__"]) == 2.0 and float(attrs["__wd_mult__"]) == 10.0
    assert json.loads(attrs["__init__"]) == ["normal", {"sigma": 0.01}]
    softmax = [n for n in _nodes(sym) if n["op"] == "SoftmaxOutput"]
    assert len(softmax) == 1 and softmax[0]["name"] == "softmax"
    assert softmax[0]["attrs"]["normalization"] == "valid"
    assert "fc7_output" in sym.get_internals().list_outputs()
    no_ce = symbols.get_symbol({**TINY, "loss": "softmax", "ce_loss": False})
    assert len(no_ce.list_outputs()) == 2


def test_get_symbol_triplet_outputs():
    sym = symbols.get_symbol({**TINY, "loss": "atriplet", "per_batch_size": 6})
    assert "fc7_weight" not in sym.list_arguments()
    _, out_shapes, _ = sym.infer_shape(data=(6, 3, 112, 112), softmax_label=(6,))
    assert out_shapes == [(6, 8), (6,), (1,)]
    assert [n["op"] for n in _nodes(sym) if n["op"] in ("MakeLoss", "BlockGrad")].count("BlockGrad") == 2


def test_get_symbol_fc7_is_margin_logits_of_fc1():
    """End to end: fc7_output of the training symbol = numpy ArcFace formula on its own fc1 and fc7_weight."""
    sym = symbols.get_symbol({**TINY, "loss": "arcface"})
    internals = sym.get_internals()
    probe = mx.sym.Group([internals["fc1_output"], internals["fc7_output"], sym[1]])
    mod = mx.mod.Module(probe, context=mx.cpu())
    mod.bind(data_shapes=[("data", (2, 3, 112, 112))], label_shapes=[("softmax_label", (2,))], for_training=False)
    mod.init_params(symbols.get_initializer("r18"))
    labels = np.array([1, 3], np.float32)
    batch = mx.io.DataBatch([mx.nd.array(np.random.RandomState(5).uniform(0, 255, (2, 3, 112, 112)))],
                            [mx.nd.array(labels)])
    mod.forward(batch, is_train=False)
    emb, fc7, prob = (o.asnumpy() for o in mod.get_outputs())
    weight = mod.get_params()[0]["fc7_weight"].asnumpy()
    ref = np_logits("arcface", emb.astype(np.float64), weight.astype(np.float64), labels.astype(int),
                    **HEAD_MARGINS["arcface"])
    np.testing.assert_allclose(fc7, ref, atol=2e-3, rtol=1e-4)
    ref_prob = np.exp(ref - ref.max(1, keepdims=True))
    np.testing.assert_allclose(prob, ref_prob / ref_prob.sum(1, keepdims=True), atol=1e-4)


def test_get_symbol_missing_keys_take_presets_and_base():
    """cosface given without margins uses its preset (not base's m2 = 0.5); y1 without emb uses 128/GDC."""
    sym = symbols.get_symbol({"network": "y1", "loss": "cosface", "num_classes": C, "per_batch_size": 2})
    _, out_shapes, _ = sym.infer_shape(data=(2, 3, 112, 112), softmax_label=(2,))
    assert out_shapes[0] == (2, 128)
    assert "conv_6dw7_7_conv2d_weight" in sym.list_arguments()
    # cosface = one_hot subtraction without arccos
    assert not [n for n in _nodes(sym) if n["op"] == "arccos"]


def test_get_symbol_logs_margins_that_differ_from_preset(caplog):
    with caplog.at_level("INFO", logger="symbols"):
        symbols.get_symbol({**TINY, "loss": "cosface", "loss_m2": 0.5, "loss_m3": 0.35})
    assert "its preset has {'loss_m2': 0.0}" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="symbols"):
        symbols.get_symbol({**TINY, "loss": "cosface"})
    assert "its preset has" not in caplog.text


def test_get_symbol_errors():
    with pytest.raises(ValueError, match="valid heads"):
        symbols.get_symbol({**TINY, "loss": "arcfce"})
    with pytest.raises(ValueError, match="num_classes"):
        symbols.get_symbol({**TINY, "num_classes": 0})
    with pytest.raises(ValueError, match="loss_m2 only"):
        symbols.get_symbol({**TINY, "loss": "arcface_v1", "loss_m1": 1.35})


# ----------------------------------------------------------------------------- presets, legacy table
def test_head_presets_match_upstream():
    expect = {"nsoftmax": (64, 1, 0, 0), "arcface": (64, 1, 0.5, 0), "cosface": (64, 1, 0, 0.35),
              "combined": (64, 1, 0.3, 0.2), "sphereface": (64, 1.5, 0, 0), "arcface_v1": (64, 1, 0.5, 0)}
    for name, (s, m1, m2, m3) in expect.items():
        p = losses.HEAD_PRESETS[name]
        assert (p["loss_s"], p["loss_m1"], p["loss_m2"], p["loss_m3"]) == (s, m1, m2, m3), name
    assert losses.HEAD_PRESETS["triplet"]["triplet_alpha"] == 0.3
    assert losses.HEAD_PRESETS["atriplet"]["triplet_alpha"] == 0.35
    assert set(losses.HEAD_PRESETS) == set(losses.list_heads())


def test_legacy_loss_types():
    assert losses.legacy_loss_config(0)["loss"] == "softmax"
    assert losses.legacy_loss_config(4, margin_s=32, margin_m=0.4, easy_margin=1) == {
        "loss": "arcface_v1", "loss_s": 32, "loss_m1": 1.0, "loss_m2": 0.4, "loss_m3": 0.0, "easy_margin": 1}
    assert losses.legacy_loss_config(2, margin_m=0.35) == {
        "loss": "cosface", "loss_s": 64.0, "loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": 0.35}
    assert losses.legacy_loss_config(5, margin_a=0.9, margin_m=0.4, margin_b=0.15) == {
        "loss": "combined", "loss_s": 64.0, "loss_m1": 0.9, "loss_m2": 0.4, "loss_m3": 0.15}
    assert losses.legacy_loss_config(1, margin_s=30.0)["loss_m1"] == 1.5
    for loss_type in losses.LEGACY_LOSS_TYPES:
        losses.check_head(losses.LEGACY_LOSS_TYPES[loss_type]["loss"])
    with pytest.raises(ValueError, match="valid"):
        losses.legacy_loss_config(7)
