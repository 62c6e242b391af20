"""insightface checkpoints in: ``eval.verification --model``, ``--pretrained`` fine-tuning and the ONNX export.

The checkpoints are produced by insightface's own graph construction rules (recognition/arcface_mxnet/symbol/
fresnet.py and fmobilefacenet.py with symbol_utils.get_fc1; deploy/face_model.py and verification.py load them
with ``mx.model.load_checkpoint``): ``LeakyReLU(act_type='prelu')`` activations (``fast_prelu=False``), the
embedding-only symbol ending at ``fc1_output`` (HEAD train.py saves ``sym = all_layers['fc1_output']`` with the
``fc7`` arguments dropped), the ``fc1`` BatchNorm with ``fix_gamma=True``, and ``mx.model.save_checkpoint``'s
``arg:``/``aux:`` params. For r50 (at 1/8 width) and y1 each is loaded, verified, fine-tuned for one step with the
engine's ``fit(pretrained=...)`` (whose network uses the fast PReLU graph: the slopes load by name) and exported.
A checkpoint that does not fit the chosen network is an error naming the first mismatching parameter.
"""
import json
import os

import mxnet as mx
import numpy as np
import pytest

import symbols
from data_fixtures import make_synthetic_dataset
from eval import verification
from eval.checkpoint_shapes import ParamMismatchError
from recognition.config import load_config
from recognition.engine import fit

SIZE = 112
NETS = {  # network -> (insightface options, embedding size, fc type as in insightface's presets)
    "r50": ({"net_multiplier": 0.125}, 64, "E"),
    "y1": ({}, 128, "GDC"),
}


def insightface_checkpoint(prefix, network, seed=0, emb_size=None):
    """Embedding-only checkpoint as insightface writes it; returns (arg_params, aux_params) as numpy dicts."""
    options, emb, fc_type = NETS[network]
    sym = symbols.get_embedding(network, emb_size=emb_size or emb, fc_type=fc_type, fast_prelu=False, **options)
    doc = json.loads(sym.tojson())
    ops = {n["op"] for n in doc["nodes"]}
    assert "LeakyReLU" in ops and "reshape_like" not in ops and sym.list_outputs() == ["fc1_output"]
    fc1 = [n for n in doc["nodes"] if n["name"] == "fc1"][0]
    assert fc1["op"] == "BatchNorm" and fc1["attrs"]["fix_gamma"] == "True"
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind([("data", (1, 3, SIZE, SIZE))], for_training=False)
    mx.random.seed(seed)
    mod.init_params(symbols.get_initializer(network))
    arg, aux = mod.get_params()
    rng = np.random.RandomState(seed)
    arg = {k: mx.nd.array(rng.uniform(0.3, 1.2, v.shape) if k.endswith("_gamma") else v.asnumpy()) for k, v in
           arg.items()}  # PReLU slopes and BN scales away from init; fc1_gamma "decayed" (ignored: fix_gamma)
    aux = {k: mx.nd.array(rng.uniform(0.5, 1.5, v.shape) if "var" in k else rng.normal(0, 0.05, v.shape))
           for k, v in aux.items()}
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    mx.model.save_checkpoint(prefix, 0, sym, arg, aux)
    keys = mx.nd.load(prefix + "-0000.params").keys()
    assert keys and all(k.startswith(("arg:", "aux:")) for k in keys)
    return {k: v.asnumpy() for k, v in arg.items()}, {k: v.asnumpy() for k, v in aux.items()}


def finetune_config(tmp_path, data, network, pretrained, emb_size=None, **extra):
    options, emb, fc_type = NETS[network]
    base = dict(network=network, emb_size=emb_size or emb, net_output=fc_type, num_classes=4,
                image_shape=[SIZE, SIZE, 3], per_batch_size=4, lr=0.001, lr_steps=[100], wd=0.0005, mom=0.9,
                max_steps=1, frequent=1, verbose=1000, val_targets=[], dataset_path=data, data_workers=1,
                prefix=str(tmp_path / "run" / "model"), ckpt=2, pretrained=pretrained, pretrained_epoch=0, seed=0,
                loss="arcface", loss_s=16.0, **options)
    base.update(extra)
    return load_config(overrides=base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), identities=4, images_per_identity=4,
                                  image_size=SIZE, pack_pairs=40)


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(NETS))
def test_insightface_checkpoint_verify_finetune_export(tmp_path, dataset, network, capsys):
    prefix = str(tmp_path / "insightface" / "model")
    arg, aux = insightface_checkpoint(prefix, network)

    # 1. eval.verification --model: 80 images + flips in batches of 8 (many forwards: the GDC head of y1 crashed
    #    MXNet's MKLDNN graph on the second one before load_embedding_module added a Flatten)
    assert verification.main(["--data-dir", dataset, "--model", f"{prefix},0", "--target", "lfw", "--batch-size",
                              "8", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "[lfw]Accuracy-Flip: " in out

    # 2. fine-tune one step from it (the engine's network uses the fast PReLU graph; slopes load by name)
    result = fit(finetune_config(tmp_path, dataset, network, prefix))
    assert result.global_step == 1 and result.final_checkpoint
    sym2, arg2, aux2 = mx.model.load_checkpoint(result.prefix, 0)
    assert sym2.list_outputs() == ["fc1_output"]
    assert set(arg) == set(arg2)  # same names: the PReLU slopes are <name>_gamma in both graphs
    for name, value in arg.items():  # one small step from the checkpoint's weights, not a re-initialisation
        if name == "fc1_gamma":  # fix_gamma: MXNet's training forward writes 1 into it
            continue
        moved = np.abs(arg2[name].asnumpy() - value).max()
        assert moved <= 0.01 + 0.02 * np.abs(value).max(), (name, moved)
    conv = "conv0_weight" if network == "r50" else "conv_1_conv2d_weight"
    assert not np.array_equal(arg2[conv].asnumpy(), arg[conv])  # ... but a step was taken

    # 3. export both checkpoints and prove them
    from eval import export_onnx as eo  # optional dependency: the export part alone needs it
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    for pfx, name in ((prefix, "insightface"), (result.prefix, "finetuned")):
        path = str(tmp_path / f"{name}.onnx")
        info = eo.export_checkpoint(pfx, 0, path, image_size=(SIZE, SIZE))
        report = eo.check(path, pfx, 0, image_size=(SIZE, SIZE), pack=os.path.join(dataset, "lfw.bin"),
                          batch_size=8, random_count=8)
        assert report["passed"] and report["max_rel_diff"] <= 1e-4, report
        assert (info["fast_prelu"] + info["fused_prelu"] == 0) == (name == "insightface")  # LeakyReLU already


@pytest.mark.slow
def test_pretrained_that_does_not_fit_names_the_first_parameter(tmp_path, dataset):
    prefix = str(tmp_path / "insightface" / "model")
    insightface_checkpoint(prefix, "r50", emb_size=32)  # trained with --emb-size 32; fine-tuned with 64
    with pytest.raises(ValueError, match=r"pre_fc1_weight.*\(32, 3136\).*\(64, 3136\)"):
        fit(finetune_config(tmp_path, dataset, "r50", prefix))


def test_verification_of_a_misfit_checkpoint_names_the_first_parameter(tmp_path, dataset, capsys):
    prefix = str(tmp_path / "a" / "model")
    insightface_checkpoint(prefix, "y1")
    other = str(tmp_path / "b" / "model")
    insightface_checkpoint(other, "y1", emb_size=64)
    os.replace(other + "-0000.params", prefix + "-0000.params")
    assert verification.main(["--data-dir", dataset, "--model", f"{prefix},0", "--target", "lfw", "--cpu"]) == 1
    err = capsys.readouterr().err
    assert "pre_fc1_weight" in err and "(64, 512)" in err and "(128, 512)" in err
    with pytest.raises(ParamMismatchError) as exc:
        verification.load_embedding_module(prefix, 0, mx.cpu(), 2, (SIZE, SIZE))
    assert (exc.value.name, exc.value.expected, exc.value.found) == ("pre_fc1_weight", (128, 512), (64, 512))
