"""Fast PReLU (relu(x) + depthwise conv of x - relu(x) with gamma as weight) equals LeakyReLU(act_type='prelu')."""
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
    np.testing.assert_allclose(y_fast, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y_slow, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_fast["data"], g_slow["data"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_fast["act_gamma"], g_slow["act_gamma"], rtol=1e-4, atol=1e-4)
    # independent reference of dL/dgamma_c = sum over batch and space of out_grad * min(x, 0)
    axes = (0,) + tuple(range(2, len(shape)))
    np.testing.assert_allclose(g_fast["act_gamma"], (out_grad * np.minimum(x, 0)).sum(axis=axes), rtol=1e-4,
                               atol=1e-4)


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


def test_network_outputs_and_gradients_equal():
    """r18 (1/8 width, no dropout) with both formulations: same params in, same loss and gradients out."""
    slow = _module(fast=False)
    args, aux = slow.get_params()
    rng = np.random.RandomState(2)
    # non-default slopes so that the slope matters
    args = {k: (mx.nd.array(rng.uniform(-0.5, 1.0, v.shape)) if k.endswith("relu1_gamma") or k == "relu0_gamma"
                else v) for k, v in args.items()}
    slow.set_params(args, aux)
    fast = _module(fast=True, params=(args, aux))
    batch = mx.io.DataBatch([mx.nd.array(rng.uniform(0, 255, (4, 3, 32, 32)))], None)
    results = []
    for mod in (slow, fast):
        mod.forward_backward(batch)
        grads = {name: mod._exec_group.grad_arrays[i][0].asnumpy()
                 for i, name in enumerate(mod._exec_group.param_names)}
        results.append((mod.get_outputs()[0].asnumpy(), grads))
    (loss_slow, grads_slow), (loss_fast, grads_fast) = results
    np.testing.assert_allclose(loss_fast, loss_slow, rtol=1e-4)
    assert set(grads_fast) == set(grads_slow)
    for name, g in grads_slow.items():
        scale = max(np.abs(g).max(), 1e-3)
        np.testing.assert_allclose(grads_fast[name], g, rtol=1e-3, atol=1e-3 * scale, err_msg=name)


def test_fast_prelu_is_the_default():
    config = {"network": "r18", "net_multiplier": 0.125, "emb_size": 8, "num_classes": 3, "per_batch_size": 2}
    ops = {n["op"] for n in json.loads(symbols.get_symbol(config).tojson())["nodes"]}
    assert "LeakyReLU" not in ops
    ops = {n["op"] for n in json.loads(symbols.get_symbol({**config, "fast_prelu": False}).tojson())["nodes"]}
    assert "LeakyReLU" in ops
