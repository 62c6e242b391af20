"""The fused PReLU C++ operator (symbols/ops): numbers, Module training, fallback, portability, actually used.

Reference is float64 numpy, never LeakyReLU(act_type='prelu'), whose gamma gradient is wrong after a Convolution
in MXNet 1.9.1 (insightface's SE units hit it: symbol/fresnet.py ``se_relu1`` follows ``se_conv1``).
The operator is built into the user cache (``$INSIGHTFACE_MX_CACHE``, default ``~/.cache/insightface-mx``) on first
use; fallback and build-race tests use private caches in subprocesses (a loaded library cannot be unloaded).
"""
import contextlib
import json
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

import symbols
from symbols import ops
from symbols.ops import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_COMPILER = build.find_compiler() is not None
needs_op = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler: the fused operator cannot be built here")


@pytest.fixture(scope="module")
def op_loaded():
    """Load the library; with a compiler present it MUST load (a silent fallback fails here)."""
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler")
    if ops.disabled():
        pytest.skip(f"{ops.ENV_SWITCH} disables the operator in this environment")
    assert ops.load(), f"fused PReLU did not load although a compiler exists: {ops.status()}"
    return True


def reference(x, gamma, dy):
    """float64 PReLU: y, dL/dx, dL/dgamma for upstream gradient dy."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    g = gamma.astype(np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))
    y = np.where(x > 0, x, g * x)
    dx = np.where(x > 0, dy, g * dy)
    dgamma = (dy * np.minimum(x, 0)).sum(axis=(0,) + tuple(range(2, x.ndim)))
    return y, dx, dgamma


def run_sym(sym, arrays, out_grad):
    args = {k: mx.nd.array(v) for k, v in arrays.items()}
    grads = {k: mx.nd.zeros(v.shape) for k, v in arrays.items()}
    ex = sym.bind(mx.cpu(), args, args_grad=grads)
    ex.forward(is_train=True)
    ex.backward(mx.nd.array(out_grad))
    return ex.outputs[0].asnumpy(), {k: g.asnumpy() for k, g in grads.items()}


def run_py(code, env_update, timeout=600):
    env = dict(os.environ)
    env.update(env_update)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, f"subprocess failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


SHAPES = [(4, 6, 5, 7), (3, 5, 1, 1), (1, 3, 11, 13), (7, 6), (1, 1), (2, 9, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_equal_float64_reference(op_loaded, shape):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(np.float32)
    x.flat[::5] = 0.0  # the kink: dx = gamma*dy there, no dgamma contribution
    gamma = rng.uniform(-1.5, 1.5, size=shape[1]).astype(np.float32)
    dy = rng.randn(*shape).astype(np.float32)
    sym = ops.prelu_op(mx.sym.Variable("data"), mx.sym.Variable("act_gamma"), "act", num_channels=shape[1])
    before = ops.call_counts()
    y, grads = run_sym(sym, {"data": x, "act_gamma": gamma}, dy)
    after = ops.call_counts()
    assert after["forward"] == before["forward"] + 1 and after["backward"] == before["backward"] + 1
    y_ref, dx_ref, dg_ref = reference(x, gamma, dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads["data"], dx_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads["act_gamma"], dg_ref, rtol=1e-5, atol=1e-5)


def test_prelu_helper_names_and_attrs_match_fast_prelu(op_loaded):
    data = mx.sym.Variable("data")
    fused = ops.prelu(data, "relu0", 16)
    assert ops.uses_fused_op(fused)
    fast = symbols.common.prelu(data, "relu0", 16, fast=True)
    assert fused.list_arguments() == fast.list_arguments() == ["data", "relu0_gamma"]
    assert fused.list_outputs() == fast.list_outputs() == ["relu0_output"]
    assert fused.attr_dict()["relu0_gamma"] == fast.attr_dict()["relu0_gamma"]
    assert json.loads(fused.attr_dict()["relu0_gamma"]["__init__"]) == ["constant", {"value": 0.25}]
    # gamma's shape is inferred from the data even without __shape__
    bare = ops.prelu_op(data, mx.sym.Variable("g"), "p")
    assert bare.infer_shape(data=(2, 7, 3, 3))[0] == [(2, 7, 3, 3), (7,)]
    with pytest.raises(mx.base.MXNetError):
        ops.prelu_op(data, mx.sym.Variable("g"), "p", num_channels=5).infer_shape(data=(2, 7, 3, 3))


THREAD_SCRIPT = """
import os, sys, numpy as np
import mxnet as mx
from symbols import ops
assert ops.load(), ops.status()
rng = np.random.RandomState(7)
out = {}
for key, shape in (("4d", (5, 7, 9, 11)), ("2d", (33, 7))):
    x = rng.randn(*shape).astype(np.float32); dy = rng.randn(*shape).astype(np.float32)
    g = rng.uniform(-1, 1, shape[1]).astype(np.float32)
    sym = ops.prelu_op(mx.sym.Variable("data"), mx.sym.Variable("g"), "p")
    a = {"data": mx.nd.array(x), "g": mx.nd.array(g)}
    gr = {k: mx.nd.zeros(v.shape) for k, v in a.items()}
    ex = sym.bind(mx.cpu(), a, args_grad=gr)
    ex.forward(is_train=True); ex.backward(mx.nd.array(dy))
    for name, arr in (("x", x), ("dy", dy), ("g", g), ("y", ex.outputs[0].asnumpy()),
                      ("dx", gr["data"].asnumpy()), ("dg", gr["g"].asnumpy())):
        out[key + "_" + name] = arr
out["threads"] = np.array(ops.call_counts()["last_threads"])
np.savez(sys.argv[-1] if len(sys.argv) > 1 else os.environ["OUT"], **out)
"""


@needs_op
def test_one_and_two_omp_threads_same_numbers(op_loaded, tmp_path):
    """OMP_NUM_THREADS=1 and 2: both equal the reference, dgamma bit-identical (deterministic reduction)."""
    results = {}
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.npz"
        run_py(THREAD_SCRIPT, {"OMP_NUM_THREADS": str(threads), "OUT": str(out)})
        results[threads] = np.load(out)
    assert int(results[1]["threads"]) == 1
    assert int(results[2]["threads"]) == 2, "the operator did not use the 2 OpenMP threads it was given"
    for key in ("4d", "2d"):
        r = results[1]
        y_ref, dx_ref, dg_ref = reference(r[key + "_x"], r[key + "_g"], r[key + "_dy"])
        for threads in (1, 2):
            res = results[threads]
            np.testing.assert_allclose(res[key + "_y"], y_ref, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(res[key + "_dx"], dx_ref, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(res[key + "_dg"], dg_ref, rtol=1e-5, atol=1e-5)
        for name in ("y", "dx", "dg"):
            assert np.array_equal(results[1][key + "_" + name], results[2][key + "_" + name]), (key, name)


def small_net(prelu_fn):
    """conv -> BN -> PReLU -> FC -> PReLU(2-D) -> FC -> SoftmaxOutput."""
    data = mx.sym.Variable("data")
    body = mx.sym.Convolution(data, num_filter=6, kernel=(3, 3), pad=(1, 1), no_bias=True, name="conv0")
    body = mx.sym.BatchNorm(body, fix_gamma=False, eps=2e-5, name="bn0")
    body = prelu_fn(body, "relu0", 6, 4)
    body = mx.sym.FullyConnected(body, num_hidden=8, name="pre_fc1")
    body = prelu_fn(body, "relu1", 8, 2)
    body = mx.sym.FullyConnected(body, num_hidden=3, name="fc7")
    return mx.sym.SoftmaxOutput(body, name="softmax")


def fused_prelu_fn(data, name, channels, ndim):
    return ops.prelu(data, name, channels, ndim=ndim)


def graph_prelu_fn(data, name, channels, ndim):
    return symbols.common.fast_prelu(data, graph_gamma(name, channels), name, channels, ndim=ndim)


def graph_gamma(name, channels):
    return mx.sym.Variable(name + "_gamma", shape=(channels,), init=mx.init.Constant(symbols.common.PRELU_INIT))


@contextlib.contextmanager
def graph_only():
    """Build symbols with the fast_prelu graph although the fused operator is loaded (the default prefers it)."""
    previous = ops.set_enabled(False)
    try:
        yield
    finally:
        ops.set_enabled(previous)


def make_module(sym, shape, arg_params, aux_params):
    mod = mx.mod.Module(sym, data_names=("data",), label_names=("softmax_label",))
    mod.bind(data_shapes=[("data", shape)], label_shapes=[("softmax_label", (shape[0],))], for_training=True)
    mod.init_params(arg_params=arg_params, aux_params=aux_params, allow_missing=False)
    mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.2, "momentum": 0.9, "wd": 5e-4})
    return mod


def test_module_training_matches_graph_and_shared_inference_sees_gamma(op_loaded):
    shape = (6, 2, 5, 5)
    rng = np.random.RandomState(3)
    fused_sym, graph_sym = small_net(fused_prelu_fn), small_net(graph_prelu_fn)
    assert ops.uses_fused_op(fused_sym) and not ops.uses_fused_op(graph_sym)
    init = mx.mod.Module(graph_sym, data_names=("data",), label_names=("softmax_label",))
    init.bind(data_shapes=[("data", shape)], label_shapes=[("softmax_label", (shape[0],))])
    init.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    arg, aux = init.get_params()
    arg["relu0_gamma"][:] = mx.nd.array(rng.uniform(-0.5, 0.8, 6))
    fused, graph = make_module(fused_sym, shape, arg, aux), make_module(graph_sym, shape, arg, aux)
    infer = mx.mod.Module(fused_sym, data_names=("data",), label_names=None)
    infer.bind(data_shapes=[("data", shape)], for_training=False, shared_module=fused)
    batches = [mx.io.DataBatch([mx.nd.array(rng.randn(*shape))], [mx.nd.array(rng.randint(0, 3, shape[0]))])
               for _ in range(4)]
    ops.reset_call_counts()
    for batch in batches:
        for mod in (fused, graph):
            mod.forward_backward(batch)
            mod.update()
    counts = ops.call_counts()
    assert counts["forward"] == 2 * len(batches) and counts["backward"] == 2 * len(batches), counts
    fa, _ = fused.get_params()
    ga, _ = graph.get_params()
    assert not np.allclose(fa["relu0_gamma"].asnumpy(), arg["relu0_gamma"].asnumpy()), "gamma was never updated"
    for name in fa:
        np.testing.assert_allclose(fa[name].asnumpy(), ga[name].asnumpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    # the inference Module shares the training weights: it must see the updated gamma (and the op must run)
    probe = mx.io.DataBatch([mx.nd.array(rng.randn(*shape))])
    infer.forward(probe, is_train=False)
    graph_infer = mx.mod.Module(graph_sym, data_names=("data",), label_names=None)
    graph_infer.bind(data_shapes=[("data", shape)], for_training=False)
    graph_infer.set_params(*fused.get_params(), allow_missing=True)
    graph_infer.forward(probe, is_train=False)
    np.testing.assert_allclose(infer.get_outputs()[0].asnumpy(), graph_infer.get_outputs()[0].asnumpy(),
                               rtol=1e-4, atol=1e-6)
    assert ops.call_counts()["forward"] == counts["forward"] + 2


@pytest.mark.parametrize("network,options,data_shape", [
    ("r18", {"net_multiplier": 0.25, "net_se": 1}, (4, 3, 32, 32)),
    ("y1", {}, (4, 3, 112, 112)),
])
def test_whole_network_fused_equals_fast_prelu_graph(op_loaded, network, options, data_shape):
    """fuse_symbol(insightface net) trains like the fast_prelu graph (also proves MKLDNN layouts reach the op
    as plain NCHW): same outputs, same gradients for every parameter, op called once per PReLU."""
    with graph_only():
        graph = symbols.get_embedding(network, **options)
    fused = ops.fuse_symbol(graph)
    n_prelu = sum(n["op"] == ops.OP_NAME for n in json.loads(fused.tojson())["nodes"])
    assert n_prelu > 0 and not ops.uses_fused_op(graph)
    assert fused.list_arguments() == graph.list_arguments()
    assert fused.list_auxiliary_states() == graph.list_auxiliary_states()
    rng = np.random.RandomState(0)
    arg_shapes, _, aux_shapes = graph.infer_shape(data=data_shape)
    init = symbols.get_initializer(network)
    args = {}
    for name, shape in zip(graph.list_arguments(), arg_shapes):
        arr = mx.nd.zeros(shape)
        if name != "data":
            init(mx.init.InitDesc(name, attrs=graph.attr_dict().get(name, {})), arr)
        args[name] = arr.asnumpy()
    args["data"] = rng.uniform(0, 255, data_shape).astype(np.float32)
    for name in args:
        if name.endswith("_gamma") and "relu" in name:  # slopes away from 0.25, some negative
            args[name] = rng.uniform(-0.5, 0.8, args[name].shape).astype(np.float32)
    aux = {n: (np.ones(s) if n.endswith("var") else np.zeros(s)).astype(np.float32)
           for n, s in zip(graph.list_auxiliary_states(), aux_shapes)}
    out_grad = rng.randn(data_shape[0], graph.infer_shape(data=data_shape)[1][0][1]).astype(np.float32)
    results = []
    ops.reset_call_counts()
    for sym in (graph, fused):
        mx.random.seed(11)  # same Dropout mask in both runs
        a = {k: mx.nd.array(v) for k, v in args.items()}
        g = {k: mx.nd.zeros(v.shape) for k, v in args.items()}
        ex = sym.bind(mx.cpu(), a, args_grad=g, aux_states={k: mx.nd.array(v) for k, v in aux.items()})
        ex.forward(is_train=True)
        ex.backward(mx.nd.array(out_grad))
        results.append((ex.outputs[0].asnumpy(), {k: v.asnumpy() for k, v in g.items()}))
    assert ops.call_counts()["forward"] == n_prelu and ops.call_counts()["backward"] == n_prelu
    (y0, g0), (y1, g1) = results
    np.testing.assert_allclose(y1, y0, rtol=1e-3, atol=1e-3 * np.abs(y0).max())
    # BN betas feeding another BN get cancellation-noise gradients: tolerance on the scale of all gradients
    scale = max(np.abs(g).max() for name, g in g0.items() if name != "data")
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-3, atol=1e-3 * scale, err_msg=name)
        if name.endswith("_gamma") and "relu" in name:  # the slopes themselves: 0.1% in norm
            assert np.linalg.norm(g1[name] - g0[name]) <= 1e-3 * np.linalg.norm(g0[name]) + 1e-7, name


def test_portable_checkpoint_round_trip_without_library(op_loaded, tmp_path):
    """ops.save_checkpoint writes a symbol with no custom op; a process that never loads the library gets the
    same outputs from it (fast_prelu and LeakyReLU forms), while the raw fused JSON fails to load there."""
    sym = small_net(fused_prelu_fn)
    shape = (4, 2, 5, 5)
    mod = mx.mod.Module(sym, data_names=("data",), label_names=("softmax_label",))
    mod.bind(data_shapes=[("data", shape)], label_shapes=[("softmax_label", (4,))], for_training=False)
    mod.init_params(mx.init.Xavier())
    arg, aux = mod.get_params()
    arg["relu0_gamma"][:] = mx.nd.array(np.linspace(-0.5, 0.9, 6))
    arg["relu1_gamma"][:] = mx.nd.array(np.linspace(0.9, -0.3, 8))
    mod.set_params(arg, aux)
    x = np.random.RandomState(5).randn(*shape).astype(np.float32)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    expected = mod.get_outputs()[0].asnumpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    ops.save_checkpoint(str(tmp_path / "fast"), 1, sym, arg, aux)
    ops.save_checkpoint(str(tmp_path / "leaky"), 1, sym, arg, aux, mode="leakyrelu")
    mx.model.save_checkpoint(str(tmp_path / "raw"), 1, sym, arg, aux)
    for prefix in ("fast", "leaky"):
        text = (tmp_path / f"{prefix}-symbol.json").read_text()
        assert ops.OP_NAME not in text
    # the rewritten symbols turn back into the fused one
    assert ops.fuse_symbol(mx.sym.load(str(tmp_path / "fast-symbol.json"))).tojson() == sym.tojson()
    assert ops.fuse_symbol(mx.sym.load(str(tmp_path / "leaky-symbol.json"))).tojson() == sym.tojson()
    code = f"""
        import numpy as np, mxnet as mx
        d = {str(tmp_path)!r}
        x = np.load(d + "/x.npy"); expected = np.load(d + "/expected.npy")
        for prefix in ("fast", "leaky"):
            sym, arg, aux = mx.model.load_checkpoint(d + "/" + prefix, 1)
            mod = mx.mod.Module(sym, data_names=("data",), label_names=("softmax_label",))
            mod.bind(data_shapes=[("data", x.shape)], label_shapes=[("softmax_label", (x.shape[0],))],
                     for_training=False)
            mod.set_params(arg, aux)
            mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
            np.testing.assert_allclose(mod.get_outputs()[0].asnumpy(), expected, rtol=1e-5, atol=1e-6)
        try:
            mx.model.load_checkpoint(d + "/raw", 1)
        except mx.base.MXNetError as exc:
            assert "fused_prelu" in str(exc)
        else:
            raise AssertionError("raw fused symbol loaded without the library")
        print("ok")
    """
    assert "ok" in run_py(code, {}).stdout


def test_portable_json_keeps_graph_without_op_unchanged():
    sym = small_net(graph_prelu_fn)
    assert json.loads(ops.portable_json(sym))["nodes"] == json.loads(sym.tojson())["nodes"]
    with pytest.raises(ValueError):
        ops.portable_json(sym, mode="nope")


FALLBACK_SCRIPT = """
import json, logging, sys
import numpy as np, mxnet as mx
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(name)s: %(message)s")
from symbols import ops
from symbols.common import prelu
used = ops.load()
print("STATUS", json.dumps(ops.status()))
data = mx.sym.Variable("data")
sym = ops.prelu(data, "act", 5)
ref_sym = prelu(data, "act", 5, fast=True)
ops_of = lambda s: [n["op"] for n in json.loads(s.tojson())["nodes"]]
assert used or (ops_of(sym) == ops_of(ref_sym) and sym.list_arguments() == ref_sym.list_arguments()
                and sym.attr_dict() == ref_sym.attr_dict()), "fallback is not the fast_prelu graph"
rng = np.random.RandomState(1)
x = rng.randn(3, 5, 4, 4).astype(np.float32); g = np.linspace(-1, 1, 5).astype(np.float32)
dy = rng.randn(3, 5, 4, 4).astype(np.float32)
a = {"data": mx.nd.array(x), "act_gamma": mx.nd.array(g)}
gr = {k: mx.nd.zeros(v.shape) for k, v in a.items()}
ex = sym.bind(mx.cpu(), a, args_grad=gr); ex.forward(is_train=True); ex.backward(mx.nd.array(dy))
gb = g.reshape(1, -1, 1, 1).astype(np.float64)
np.testing.assert_allclose(ex.outputs[0].asnumpy(), np.where(x > 0, x, gb * x), rtol=1e-6, atol=1e-7)
np.testing.assert_allclose(gr["data"].asnumpy(), np.where(x > 0, dy, gb * dy), rtol=1e-6, atol=1e-7)
np.testing.assert_allclose(gr["act_gamma"].asnumpy(), (dy * np.minimum(x, 0)).sum(axis=(0, 2, 3)), rtol=1e-5,
                           atol=1e-5)
print("USED", used, "FUSED_NODE", ops.uses_fused_op(sym))
"""


@pytest.mark.parametrize("case", ["env_switch", "no_compiler", "compiler_fails", "corrupt_library"])
def test_fallback_to_fast_prelu_graph(case, tmp_path):
    env = {"INSIGHTFACE_MX_CACHE": str(tmp_path / "cache")}
    if case == "env_switch":
        env[ops.ENV_SWITCH] = "0"
        expect = "disabled by " + ops.ENV_SWITCH
    elif case == "no_compiler":
        env["CXX"] = str(tmp_path / "no-such-g++")
        expect = "no C++ compiler"
    elif case == "compiler_fails":
        fake = tmp_path / "fake-g++"
        fake.write_text("#!/bin/sh\necho 'simulated compiler error' >&2\nexit 3\n")
        fake.chmod(0o755)
        env["CXX"] = str(fake)
        expect = "simulated compiler error"
    else:  # a file that is not a shared library sits where the built library should be
        if not HAVE_COMPILER:
            pytest.skip("no C++ compiler")
        sub_env = dict(os.environ, **env)
        path = subprocess.run([sys.executable, "-c", "from symbols.ops import build; print(build.library_path())"],
                              cwd=ROOT, env=sub_env, stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"not an ELF file")
        expect = "load of"
    out = run_py(FALLBACK_SCRIPT, env).stdout
    assert "USED False FUSED_NODE False" in out, out
    assert expect in out, out
    assert out.count("PReLU: fast_prelu graph") == 1, out  # logged, once


@needs_op
@pytest.mark.slow
def test_concurrent_builds_do_not_race(tmp_path):
    """Two processes build into one fresh cache at once: both load the op, one library, no temp files left."""
    env = dict(os.environ, INSIGHTFACE_MX_CACHE=str(tmp_path), PYTHONPATH=ROOT)
    env.pop(ops.ENV_SWITCH, None)
    code = "from symbols import ops; assert ops.load(), ops.status(); print(ops.status()['path'])"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    files = sorted(os.listdir(tmp_path / "ops"))
    assert [f for f in files if f.endswith(".so")] == [os.path.basename(paths.pop())], files
    assert not [f for f in files if f.endswith(".tmp")], files


def test_grad_req_null_respected_and_add_overwrites(op_loaded):
    """Documents the library-API limit: grad_req 'null' leaves the buffer alone, 'add' overwrites (not accumulates)."""
    sym = ops.prelu_op(mx.sym.Variable("data"), mx.sym.Variable("g"), "p")
    rng = np.random.RandomState(2)
    x, dy = rng.randn(2, 3, 4, 4).astype(np.float32), rng.randn(2, 3, 4, 4).astype(np.float32)
    gamma = np.array([0.1, 0.5, -0.2], np.float32)
    _, dx_ref, dg_ref = reference(x, gamma, dy)
    for req in ({"data": "write", "g": "null"}, {"data": "add", "g": "add"}):
        args = {"data": mx.nd.array(x), "g": mx.nd.array(gamma)}
        grads = {k: mx.nd.ones(v.shape) for k, v in args.items()}
        ex = sym.bind(mx.cpu(), args, args_grad=grads, grad_req=req)
        ex.forward(is_train=True)
        ex.backward(mx.nd.array(dy))
        np.testing.assert_allclose(grads["data"].asnumpy(), dx_ref, rtol=1e-6, atol=1e-7)
        if req["g"] == "null":
            assert np.array_equal(grads["g"].asnumpy(), np.ones(3, np.float32))
        else:  # 'add' would give 1 + dgamma; the library API writes dgamma
            np.testing.assert_allclose(grads["g"].asnumpy(), dg_ref, rtol=1e-5, atol=1e-5)


def test_horovod_imported_first_gives_the_fallback_not_a_crash():
    """mx.library.load after `import horovod.mxnet` dies with SIGFPE: load() must refuse and fall back."""
    import importlib.util
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovod is not installed (make install-dist)")
    code = ("import horovod.mxnet\nfrom symbols import ops\nimport symbols\n"
            "assert ops.load() is False, ops.status()\nassert 'horovod' in ops.status()['reason']\n"
            "symbols.get_embedding('r18', emb_size=8, net_multiplier=0.25)\nprint('fallback ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-2000:]


def test_engine_trains_with_the_fused_op_and_saves_a_portable_checkpoint(tmp_path):
    """With ``fused_prelu = True`` on CPU contexts the engine's PReLU is the fused operator (its kernels run) and
    every saved ``-symbol.json`` is the standard graph; ``fused_prelu = False`` (the default) trains the graph."""
    if not ops.load():
        pytest.skip(f"fused operator unavailable here: {ops.status()['reason']}")
    from data_fixtures import make_synthetic_dataset
    from recognition.config import load_config
    from recognition.engine import fit
    data = make_synthetic_dataset(tmp_path, identities=4, images_per_identity=4, image_size=32, holdout_identities=0)
    base = {"dataset_path": data, "network": "r18", "net_multiplier": 0.25, "emb_size": 16, "image_shape": "32,32,3",
            "per_batch_size": 4, "max_steps": 2, "verbose": 2, "frequent": 1, "lr": 0.01, "data_workers": 1,
            "val_targets": ""}
    ops.reset_call_counts()
    result = fit(load_config(overrides={**base, "fused_prelu": True, "prefix": str(tmp_path / "fused" / "model")}))
    assert ops.call_counts()["forward"] > 0 and ops.call_counts()["backward"] > 0
    saved = open(result.prefix + "-symbol.json").read()
    assert not ops.uses_fused_op(saved)
    sym, arg, aux = mx.model.load_checkpoint(result.prefix, 0)
    assert any(name.endswith("_gamma") for name in arg)
    ops.reset_call_counts()
    fit(load_config(overrides={**base, "prefix": str(tmp_path / "graph" / "model")}))
    assert ops.call_counts()["forward"] == 0
    assert not ops.available()  # opt-in, and the engine's choice does not leak into later symbol builds
