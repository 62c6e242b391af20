"""python -m eval.verification end to end on tiny checkpoints and a tiny pack."""
import json
import os
import re
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest

from eval import verification as ver
from iterators.formats.bin_pack import write_bin

HW = 8


def _pack(path, n_pairs=20, seed=0):
    """Genuine pairs are noisy copies, impostors unrelated images (8x8 PNG, lossless)."""
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for i in range(n_pairs):
        same = i % 2 == 0
        a = rng.integers(0, 256, size=(HW, HW, 3))
        b = np.clip(a + rng.normal(0, 8, size=a.shape), 0, 255) if same else rng.integers(0, 256, size=a.shape)
        for img in (a, b):
            bins.append(cv2.imencode(".png", img.astype(np.uint8))[1])
        issame.append(same)
    write_bin(path, bins, issame)


def _params(seed=0, emb=6, classes=5):
    rng = np.random.default_rng(seed)
    arg = {"fc1_weight": mx.nd.array(rng.normal(0, 0.05, size=(emb, 3 * HW * HW))),
           "fc1_bias": mx.nd.zeros((emb,)),
           "fc7_weight": mx.nd.array(rng.normal(0, 0.1, size=(classes, emb)))}
    return arg


def _embedding_symbol(emb=6):
    return mx.sym.FullyConnected(mx.sym.Flatten(mx.sym.Variable("data")), num_hidden=emb, name="fc1")


def _training_symbol(emb=6, classes=5):
    fc1 = _embedding_symbol(emb)
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=classes, no_bias=True, name="fc7")
    return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7, name="softmax")])


@pytest.fixture()
def setup(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _pack(data_dir / "lfw.bin")
    _pack(data_dir / "agedb_30.bin", seed=1)
    prefix = str(tmp_path / "models" / "model-r18-tiny")  # '-' in the prefix broke upstream's epoch parsing
    os.makedirs(os.path.dirname(prefix))
    emb_only = {k: v for k, v in _params().items() if not k.startswith("fc7")}
    mx.model.save_checkpoint(prefix, 1, _embedding_symbol(), emb_only, {})
    mx.model.save_checkpoint(prefix, 2, _embedding_symbol(), {k: v * 2 for k, v in emb_only.items()}, {})
    full = str(tmp_path / "models" / "full")
    mx.model.save_checkpoint(full, 3, _training_symbol(), _params(), {})
    return data_dir, prefix, full


def _run(capsys, argv):
    code = ver.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_end_to_end_json_and_roc_plot(setup, tmp_path, capsys):
    data_dir, prefix, _ = setup
    out_json, out_png = tmp_path / "res.json", tmp_path / "roc.png"
    code, out, err = _run(capsys, ["--data-dir", str(data_dir), "--model", prefix + ",1,2",
                                   "--target", "lfw,cfp_fp,agedb_30", "--batch-size", "16", "--cpu",
                                   "--image-size", f"{HW},{HW}", "--json", str(out_json), "--roc-plot", str(out_png)])
    assert code == 0, err
    for name in ("lfw", "agedb_30"):
        assert len(re.findall(rf"^\[{name}\]XNorm: \d+\.\d{{6}}$", out, re.M)) == 2
        assert len(re.findall(rf"^\[{name}\]Accuracy-Flip: [01]\.\d{{5}}\+-\d\.\d{{5}}$", out, re.M)) == 2
        assert len(re.findall(rf"^\[{name}\]TPR@FAR=1e-3: [01]\.\d{{5}}\+-\d\.\d{{5}}$", out, re.M)) == 2
        assert re.search(rf"^Max of \[{name}\] is [01]\.\d{{5}}$", out, re.M)
    assert "cfp_fp" not in out.replace("lfw,cfp_fp", "")  # missing pack skipped silently as upstream
    payload = json.loads(out_json.read_text())
    assert [(r["target"], r["epoch"]) for r in payload["results"]] == [
        ("lfw", 1), ("lfw", 2), ("agedb_30", 1), ("agedb_30", 2)]
    # Epoch 2 = epoch 1 with weights x2 and zero bias: same normalised embeddings, same accuracy.
    assert payload["results"][0]["accuracy_flip"] == payload["results"][1]["accuracy_flip"]
    assert payload["results"][1]["xnorm"] == pytest.approx(2 * payload["results"][0]["xnorm"], rel=1e-5)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The CLI's numbers are test()'s on a Module built by hand from the checkpoint.
    sym, arg, aux = mx.model.load_checkpoint(prefix, 1)
    mod = mx.mod.Module(sym, context=mx.cpu(), label_names=None)
    mod.bind(data_shapes=[("data", (16, 3, HW, HW))], for_training=False)
    mod.set_params(arg, aux)
    res = ver.test(ver.load_bin(str(data_dir / "lfw.bin"), (HW, HW)), mod, 16)
    assert payload["results"][0]["accuracy_flip"] == res.acc2
    assert payload["results"][0]["tpr_at_far_1e-3"] == res.val


def test_full_training_checkpoint_is_cut_at_fc1(setup, tmp_path, capsys):
    data_dir, prefix, full = setup
    j1, j2 = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--data-dir", str(data_dir), "--target", "lfw", "--cpu", "--image-size", f"{HW},{HW}"]
    assert _run(capsys, common + ["--model", full + ",3", "--json", str(j1)])[0] == 0
    assert _run(capsys, common + ["--model", prefix + ",1", "--json", str(j2)])[0] == 0
    a, b = (json.loads(p.read_text())["results"][0] for p in (j1, j2))
    assert a["accuracy_flip"] == b["accuracy_flip"] and a["xnorm"] == pytest.approx(b["xnorm"], rel=1e-6)


def test_epoch_discovery_bar_separator_and_max(setup, tmp_path, capsys):
    data_dir, prefix, _ = setup
    # a different model whose name extends the prefix must not be picked up
    mx.model.save_checkpoint(prefix + "-extra", 7, _embedding_symbol(), _params(), {})
    assert ver.find_epochs(prefix) == [2, 1]
    assert ver.parse_model_arg(prefix + ",1|2") == (prefix, [1, 2])
    assert ver.parse_model_arg(prefix + ",3,5|8") == (prefix, [3, 5, 8])
    with pytest.raises(ValueError, match="epoch 'x' is not a non-negative integer"):
        ver.parse_model_arg(prefix + ",x")
    out_json = tmp_path / "r.json"
    code, out, err = _run(capsys, ["--data-dir", str(data_dir), "--model", prefix, "--target", "lfw", "--cpu",
                                   "--max", "0,1", "--image-size", f"{HW},{HW}", "--json", str(out_json)])
    assert code == 0, err
    assert json.loads(out_json.read_text())["epochs"] == [2]


def test_cli_errors_are_messages(setup, capsys):
    data_dir, prefix, _ = setup
    base = ["--data-dir", str(data_dir), "--image-size", f"{HW},{HW}"]
    code, _, err = _run(capsys, base + ["--model", prefix + ",1", "--gpu", "0"])
    assert code == 1 and "--gpu 0: MXNet sees 0 GPU(s)" in err and "--cpu" in err
    code, _, err = _run(capsys, base + ["--model", prefix + ",9", "--cpu"])
    assert code == 1 and "model-r18-tiny-0009.params" in err
    code, _, err = _run(capsys, base + ["--model", prefix + ",1", "--cpu", "--target", "cfp_ff"])
    assert code == 1 and "none of the targets cfp_ff" in err
    nofc1 = os.path.join(os.path.dirname(prefix), "nofc1")
    mx.model.save_checkpoint(nofc1, 1, mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=2, name="emb"),
                             {"emb_weight": mx.nd.zeros((2, 3 * HW * HW)), "emb_bias": mx.nd.zeros((2,))}, {})
    code, _, err = _run(capsys, base + ["--model", nofc1 + ",1", "--cpu"])
    assert code == 1 and "no 'fc1_output' node" in err


def test_uneven_and_too_small_packs(setup, tmp_path, capsys):
    data_dir, prefix, _ = setup
    _pack(data_dir / "odd.bin", n_pairs=23, seed=2)
    _pack(data_dir / "tiny.bin", n_pairs=7, seed=3)
    base = ["--data-dir", str(data_dir), "--model", prefix + ",1", "--cpu", "--image-size", f"{HW},{HW}"]
    out_json = tmp_path / "odd.json"
    code, out, err = _run(capsys, base + ["--target", "odd", "--json", str(out_json)])
    assert code == 0, err
    record = json.loads(out_json.read_text())["results"][0]
    assert record["num_pairs"] == 23 and len(record["fold_accuracy"]) == 10
    # 7 pairs cannot make 10 folds (sklearn's KFold raises upstream): one message naming the pack and the fix
    code, out, err = _run(capsys, base + ["--target", "tiny"])
    assert code == 1
    assert str(data_dir / "tiny.bin") in err and "7 pairs cannot be split into 10 folds" in err and "--nfolds" in err
    code, out, err = _run(capsys, base + ["--target", "tiny", "--nfolds", "5", "--json", str(out_json)])
    assert code == 0, err
    assert len(json.loads(out_json.read_text())["results"][0]["fold_accuracy"]) == 5


def test_module_layout_reexports():
    from eval import inference, protocol
    assert ver.load_embedding_module is inference.load_embedding_module and ver.embed is inference.embed
    for name in ("evaluate", "calculate_roc", "calculate_val", "calculate_accuracy", "calculate_val_far",
                 "evaluate_embeddings", "pixel_baseline", "format_lines", "VerificationResult"):
        assert getattr(ver, name) is getattr(protocol, name), name
    import ast
    tree = ast.parse(open(protocol.__file__, encoding="utf-8").read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and not any(m.split(".")[0] == "mxnet" for m in imported)  # the protocol is numpy-only


@pytest.mark.slow
def test_python_dash_m_entry_point(setup):
    data_dir, prefix, _ = setup
    proc = subprocess.run([sys.executable, "-m", "eval.verification", "--data-dir", str(data_dir), "--model",
                           prefix + ",1", "--target", "lfw", "--cpu", "--image-size", f"{HW},{HW}"],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\[lfw\]Accuracy-Flip: [01]\.\d{5}\+-\d\.\d{5}$", proc.stdout, re.M)
