"""Fast PReLU equals LeakyReLU(act_type='prelu'): the 4-D form relu(x) + dw_-gamma(relu(dw_-1(x))) (dw a depthwise
kernel-1 Deconvolution) and the rank-agnostic form relu(x) + dwconv1d(x - relu(x), gamma) of earlier checkpoints."""
import json

import mxnet as mx
import numpy as np
import pytest

import symbols
from symbols.common import prelu


def run(sym, arrays, out_grad):
    args = {k: mx.nd.array(v) for k, v in arrays.items()}
    grads = {k: mx.nd.zeros(v.shape) for k, v in arrays.items()}
    ex = sym.bind(mx.cpu(), args, args_grad=grads)
    ex.forward(is_train=True)
    ex.backward(mx.nd.array(out_grad))
    return ex.outputs[0].asnumpy(), {k: g.asnumpy() for k, g in grads.items()}


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (5, 6)])
def test_fast_prelu_equals_leaky_relu_prelu(shape):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(np.float32)
    gamma = np.array([0.25, -0.4, 0.0, 1.5, 0.01, 0.7], np.float32)
    out_grad = rng.randn(*shape).astype(np.float32)
    data = mx.sym.Variable("data")
    fast = prelu(data, "act", 6, fast=True, ndim=len(shape))
    slow = mx.sym.LeakyReLU(data=data, act_type="prelu", name="act")
    assert fast.list_arguments() == slow.list_arguments() == ["data", "act_gamma"]
    arrays = {"data": x, "act_gamma": gamma}
    y_fast, g_fast = run(fast, arrays, out_grad)
    y_slow, g_slow = run(slow, arrays, out_grad)
    ref = np.where(x > 0, x, gamma.reshape((1, -1) + (1,) * (len(shape) - 2)) * x)
    np.testing.assert_array_equal(y_fast, ref)  # x exactly where x > 0, one float32 rounding of gamma * x elsewhere
    np.testing.assert_allclose(y_slow, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_fast["data"], g_slow["data"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_fast["act_gamma"], g_slow["act_gamma"], rtol=1e-4, atol=1e-4)
    # independent reference of dL/dgamma_c = sum over batch and space of out_grad * min(x, 0)
    axes = (0,) + tuple(range(2, len(shape)))
    np.testing.assert_allclose(g_fast["act_gamma"], (out_grad * np.minimum(x, 0)).sum(axis=axes), rtol=1e-4,
                               atol=1e-4)


def test_fast_prelu_4d_graph_uses_only_layout_keeping_operators():
    """The 4-D form holds only operators with MKLDNN kernels that keep the blocked layout (the tiny ops on
    gamma (C,) and on the constant -1 weight aside); elemwise_sub / reshape_like / Flatten on the activation would
    convert it to NCHW and back at every call. Other ranks get the rank-agnostic form."""
    data = mx.sym.Variable("data")
    ops4 = [n["op"] for n in json.loads(prelu(data, "act", 6, fast=True).tojson())["nodes"] if n["op"] != "null"]
    assert sorted(ops4) == ["Activation", "Activation", "Deconvolution", "Deconvolution", "Reshape", "Reshape",
                            "elemwise_add", "negative", "negative", "ones_like"]
    ops2 = {n["op"] for n in json.loads(prelu(data, "act", 6, fast=True, ndim=2).tojson())["nodes"]}
    assert {"Convolution", "elemwise_sub", "reshape_like"} <= ops2 and "Deconvolution" not in ops2


def test_gradients_at_a_training_shape_match_float64():
    """(32, 64, 56, 56), r18 stage 1 / y1 conv_1 at batch 32: dL/dx bitwise (g where x > 0, one rounding of gamma * g
    elsewhere), dL/dgamma within float32 summation error of the float64 sum of g * min(x, 0)."""
    rng = np.random.RandomState(5)
    shape = (32, 64, 56, 56)
    x = (rng.randn(*shape) + 0.5).astype(np.float32)
    gamma = rng.uniform(-0.5, 1.0, shape[1]).astype(np.float32)
    out_grad = rng.randn(*shape).astype(np.float32)
    y, grads = run(prelu(mx.sym.Variable("data"), "act", shape[1], fast=True), {"data": x, "act_gamma": gamma},
                   out_grad)
    g4 = gamma.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(y, np.where(x > 0, x, g4 * x))
    np.testing.assert_array_equal(grads["data"], np.where(x > 0, out_grad, g4 * out_grad))
    want = (out_grad.astype(np.float64) * np.minimum(x, 0)).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(grads["act_gamma"], want, rtol=1e-4, atol=1e-4)


def test_inference_module_sees_set_params_after_first_forward(monkeypatch):
    """MKLDNN's inference subgraph pass caches the weights of the 2-D convolutions it fuses at the first forward;
    the PReLU graph's per-channel products must not be such convolutions, or an inference Module given new
    parameters with set_params would keep the first slopes (checked after conv + BN, as in the networks)."""
    data = mx.sym.Variable("data")
    body = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), no_bias=True, name="conv0")
    body = mx.sym.BatchNorm(body, fix_gamma=False, name="bn0")
    body = prelu(body, "relu0", 4, fast=True)
    sym = mx.sym.Convolution(body, num_filter=4, kernel=(3, 3), pad=(1, 1), no_bias=True, name="conv1")
    mod = mx.mod.Module(sym, label_names=None)
    mod.bind(data_shapes=[("data", (2, 3, 6, 6))], for_training=False)
    mod.init_params(mx.init.Normal(1.0))
    args, aux = mod.get_params()
    batch = mx.io.DataBatch([mx.nd.array(np.random.RandomState(3).randn(2, 3, 6, 6))])
    outputs = []
    for slopes in ([0.25] * 4, [-3.0, 0.5, 2.0, 0.0]):
        args["relu0_gamma"] = mx.nd.array(slopes)
        mod.set_params(args, aux)
        mod.forward(batch, is_train=False)
        outputs.append(mod.get_outputs()[0].asnumpy())
    fresh = mx.mod.Module(sym, label_names=None)
    fresh.bind(data_shapes=[("data", (2, 3, 6, 6))], for_training=False)
    fresh.set_params(args, aux)
    fresh.forward(batch, is_train=False)
    assert np.abs(outputs[1] - outputs[0]).max() > 1e-2
    np.testing.assert_allclose(outputs[1], fresh.get_outputs()[0].asnumpy(), rtol=1e-5, atol=1e-5)
    # and both are PReLU: the same graph without MKLDNN's inference fusions (which once turned it into a ReLU)
    monkeypatch.setenv("MXNET_SUBGRAPH_BACKEND", "NONE")
    plain = mx.mod.Module(sym, label_names=None)
    plain.bind(data_shapes=[("data", (2, 3, 6, 6))], for_training=False)
    plain.set_params(args, aux)
    plain.forward(batch, is_train=False)
    np.testing.assert_allclose(outputs[1], plain.get_outputs()[0].asnumpy(), rtol=1e-5, atol=1e-4)


def test_fast_prelu_gamma_attrs():
    sym = prelu(mx.sym.Variable("data"), "relu0", 16, fast=True)
    attrs = sym.attr_dict()["relu0_gamma"]
    assert json.loads(attrs["__init__"]) == ["constant", {"value": 0.25}]
    assert attrs["__shape__"] == "(16,)"


def test_executor_sees_new_gamma():
    """An executor made with Symbol.bind (MKLDNN backend on) picks up in-place writes to gamma."""
    data = mx.sym.Variable("data")
    sym = prelu(data, "act", 3, fast=True)
    x = mx.nd.array(np.random.RandomState(1).randn(2, 3, 4, 4))
    gamma = mx.nd.array([0.25, 0.25, 0.25])
    ex = sym.bind(mx.cpu(), {"data": x, "act_gamma": gamma}, grad_req="null")
    ex.forward(is_train=False)
    gamma[:] = mx.nd.array([0.5, -1.0, 2.0])
    ex.forward(is_train=False)
    xn = x.asnumpy()
    ref = np.where(xn > 0, xn, np.array([0.5, -1.0, 2.0]).reshape(1, 3, 1, 1) * xn)
    np.testing.assert_allclose(ex.outputs[0].asnumpy(), ref, rtol=1e-6, atol=1e-6)


def test_shared_inference_module_sees_gamma_updates():
    """Train-time verification / triplet mining bind an inference Module with shared_module=the training Module;
    MKLDNN's inference subgraph pass must not freeze the slopes (it caches 2-D conv weights it is given)."""
    sym = prelu(mx.sym.Variable("data"), "act", 3, fast=True)
    batch = mx.io.DataBatch([mx.nd.array(np.random.RandomState(3).randn(2, 3, 4, 4))])
    train = mx.mod.Module(sym, data_names=("data",), label_names=None)
    train.bind(data_shapes=[("data", (2, 3, 4, 4))], for_training=True)
    train.init_params(mx.init.Xavier())
    train.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.5})
    infer = mx.mod.Module(sym, data_names=("data",), label_names=None)
    infer.bind(data_shapes=[("data", (2, 3, 4, 4))], for_training=False, shared_module=train)
    infer.forward(batch, is_train=False)
    for _ in range(2):
        train.forward(batch, is_train=True)
        train.backward([mx.nd.ones((2, 3, 4, 4))])
        train.update()
        gamma = train.get_params()[0]["act_gamma"].asnumpy()
        assert not np.allclose(gamma, 0.25)
        infer.forward(batch, is_train=False)
        xn = batch.data[0].asnumpy()
        ref = np.where(xn > 0, xn, gamma.reshape(1, 3, 1, 1) * xn)
        np.testing.assert_allclose(infer.get_outputs()[0].asnumpy(), ref, rtol=1e-5, atol=1e-6)


def _module(fast, params=None):
    sym = symbols.get_embedding("r18", emb_size=16, fc_type="I", net_multiplier=0.125, fast_prelu=fast)
    sym = mx.sym.make_loss(mx.sym.sum(mx.sym.square(sym)))
    mod = mx.mod.Module(sym, data_names=("data",), label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (4, 3, 32, 32))], for_training=True)
    if params is None:
        mod.init_params(symbols.get_initializer("r18"))
    else:
        mod.set_params(*params)
    return mod


def _loss_and_grads(mod, data):
    mod.forward_backward(mx.io.DataBatch([mx.nd.array(data)], None))
    grads = {name: mod._exec_group.grad_arrays[i][0].asnumpy() for i, name in enumerate(mod._exec_group.param_names)}
    return mod.get_outputs()[0].asnumpy(), grads


def test_network_outputs_and_gradients_equal():
    """r18 (1/8 width, batch 4, no dropout) with both formulations: same params in, same loss and gradients out.

    The forward pass is bitwise LeakyReLU's, so the loss is equal exactly. The backward passes sum in different
    orders, and this tiny net in training-mode BatchNorm amplifies rounding (some gradients move by ~5% when the
    input moves by one ulp), so each gradient must agree with LeakyReLU's within 3x the change that a one-ulp
    perturbation of the input causes in LeakyReLU's own gradient (plus 1e-3 of its scale); a wrong formula moves
    them by far more.
    """
    slow = _module(fast=False)
    args, aux = slow.get_params()
    rng = np.random.RandomState(2)
    # non-default slopes so that the slope matters
    args = {k: (mx.nd.array(rng.uniform(-0.5, 1.0, v.shape)) if k.endswith("relu1_gamma") or k == "relu0_gamma"
                else v) for k, v in args.items()}
    slow.set_params(args, aux)
    fast = _module(fast=True, params=(args, aux))
    data = rng.uniform(0, 255, (4, 3, 32, 32)).astype(np.float32)
    ulp = np.spacing(np.abs(data)) * rng.choice([-1.0, 1.0], data.shape)
    loss_slow, grads_slow = _loss_and_grads(slow, data)
    _, grads_nudged = _loss_and_grads(_module(fast=False, params=(args, aux)), (data + ulp).astype(np.float32))
    loss_fast, grads_fast = _loss_and_grads(fast, data)
    np.testing.assert_array_equal(loss_fast, loss_slow)
    assert set(grads_fast) == set(grads_slow)
    assert any(k.endswith("_gamma") and "relu" in k for k in grads_fast)
    for name, g in grads_slow.items():
        sensitivity = np.abs(grads_nudged[name] - g).max()
        scale = max(np.abs(g).max(), 1e-3)
        np.testing.assert_allclose(grads_fast[name], g, rtol=1e-3, atol=1e-3 * scale + 3 * sensitivity, err_msg=name)


def test_fast_prelu_is_the_default():
    config = {"network": "r18", "net_multiplier": 0.125, "emb_size": 8, "num_classes": 3, "per_batch_size": 2}
    ops = {n["op"] for n in json.loads(symbols.get_symbol(config).tojson())["nodes"]}
    assert "LeakyReLU" not in ops
    ops = {n["op"] for n in json.loads(symbols.get_symbol({**config, "fast_prelu": False}).tojson())["nodes"]}
    assert "LeakyReLU" in ops
