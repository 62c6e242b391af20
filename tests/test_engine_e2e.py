"""End to end: ``python -m recognition.train_softmax`` on a synthetic .rec + .bin with a tiny real network,
``--pretrained`` from its embedding checkpoint, and train-time verification seeing the live weights."""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from data_fixtures import make_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 32  # fresnet downsamples 16x: 32x32 inputs end in a 2x2 map, enough for a smoke run
TINY_NET = ["--network", "r18", "--version-multiplier", "0.0625", "--emb-size", "16", "--per-batch-size", "8",
            "--set", "data_workers=1", "--frequent", "2", "--verbose", "3", "--target", "lfw", "--lr", "0.05",
            "--margin-s", "16", "--margin-m", "0.2"]


def _train(args, cwd):
    proc = subprocess.run([sys.executable, "-m", "recognition.train_softmax", *args], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_softmax_cli_end_to_end_then_pretrained(tmp_path):
    data = make_synthetic_dataset(tmp_path, identities=8, images_per_identity=6, image_size=IMAGE, pack_pairs=40)
    run = tmp_path / "run"
    _train(["--data-dir", data, "--prefix", str(run / "model"), "--max-steps", "6", "--lr-steps", "4", *TINY_NET],
           tmp_path)
    log = (run / "training.log").read_text()
    for line in ("num_classes 8", "image_size [32, 32]", "Epoch[0] Batch [0-2]\tSpeed: ", "acc=", "lossvalue=",
                 "[lfw][3]XNorm: ", "[lfw][3]Accuracy-Flip: ", "[3]Accuracy-Highest: ", "[lfw][6]Accuracy-Flip: ",
                 "saving 1", "lr change to 0.005", "saving 0 (final weights, global step 6)"):
        assert line in log, line
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ver = [r for r in records if "verification" in r]
    assert [r["step"] for r in ver] == [3, 6]
    assert 0.0 <= ver[0]["verification"]["lfw"]["acc"] <= 1.0 and ver[0]["verification"]["lfw"]["xnorm"] > 0
    assert any("speed" in r and "acc" in r and "lossvalue" in r for r in records)
    for name in ("model-symbol.json", "model-0000.params", "model-0001.params", "training_curves.png",
                 "config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["num_classes"] == 8  # from property
    sym, arg, aux = mx.model.load_checkpoint(str(run / "model"), 0)
    assert sym.list_outputs() == ["fc1_output"] and not [k for k in arg if k.startswith("fc7")]

    # two-stage recipe: weights only from the embedding checkpoint, fc7 missing and initialised
    run2 = tmp_path / "run2"
    _train(["--data-dir", data, "--prefix", str(run2 / "model"), "--max-steps", "2", "--pretrained",
            f"{run / 'model'},0", "--loss", "softmax", *TINY_NET], tmp_path)
    log2 = (run2 / "training.log").read_text()
    assert f"loading {run / 'model'} 0" in log2 and "not in the checkpoint, initialised: fc7_bias, fc7_weight" in log2


@pytest.mark.slow
def test_train_time_verification_sees_updated_weights(tmp_path):
    """Verification runs on the TRAINING Module (as upstream). MKLDNN executors may cache weights, so prove
    that after updates its embeddings equal those of a freshly bound inference Module with the new weights."""
    import symbols
    from eval import verification
    from recognition.config import load_config

    data = make_synthetic_dataset(tmp_path, identities=4, images_per_identity=4, image_size=IMAGE, pack_pairs=20)
    cfg = load_config(overrides=dict(network="r18", net_multiplier=0.0625, emb_size=16, num_classes=4,
                                     image_shape=[IMAGE, IMAGE, 3], per_batch_size=8))
    batch = 8
    module = mx.mod.Module(symbols.get_symbol(cfg), context=[mx.cpu()], label_names=("softmax_label",))
    module.bind(data_shapes=[("data", (batch, 3, IMAGE, IMAGE))], label_shapes=[("softmax_label", (batch,))])
    module.init_params(symbols.get_initializer("r18"))
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.05, "momentum": 0.9})
    pack = verification.load_bin(os.path.join(data, "lfw.bin"), (IMAGE, IMAGE))
    from iterators import FaceImageIter
    train = FaceImageIter(batch, (3, IMAGE, IMAGE), os.path.join(data, "train.rec"), shuffle=True, seed=0,
                          num_workers=0)
    batches = list(train)  # 2 batches of 8
    # The engine verifies only after updates (step % verbose == 0); an inference forward on a fresh training
    # Module before any training forward crashes MKLDNN with fast PReLU ("could not create a primitive
    # descriptor for a sum primitive"), so train one step first, as the engine does.
    module.forward_backward(batches[0])
    module.update()
    mx.nd.waitall()  # as VerificationCallback.run
    before = verification.test(pack, module, batch, 10).embeddings_list[0]
    for train_batch in batches * 2:
        module.forward_backward(train_batch)
        module.update()
    mx.nd.waitall()
    after = verification.test(pack, module, batch, 10).embeddings_list[0]

    arg, aux = module.get_params()
    fresh = mx.mod.Module(symbols.get_symbol(cfg).get_internals()["fc1_output"], context=[mx.cpu()],
                          label_names=None)
    fresh.bind(data_shapes=[("data", (batch, 3, IMAGE, IMAGE))], for_training=False)
    fresh.set_params(arg, aux, allow_extra=True)
    reference = verification.test(pack, fresh, batch, 10).embeddings_list[0]
    assert np.abs(after - before).max() > 1e-2 * np.abs(before).max()   # the weights did change
    np.testing.assert_allclose(after, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())
