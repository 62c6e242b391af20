"""python -m eval.embed: same embeddings as the verifier, flip/no-norm semantics, DIR/.lst/.rec inputs,
unreadable images listed, resume after an interruption."""
import json
import os

import cv2
import mxnet as mx
import numpy as np
import pytest

from eval import embed as emb
from eval import verification as ver
from iterators.formats.bin_pack import write_bin
from iterators.formats.recordio import write_face_rec

HW = 16
EMB = 6


def _images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(HW, HW, 3)).astype(np.uint8) for _ in range(n)]


def _symbol():
    return mx.sym.FullyConnected(mx.sym.Flatten(mx.sym.Variable("data")), num_hidden=EMB, name="fc1")


@pytest.fixture()
def setup(tmp_path):
    """A tiny checkpoint, 24 PNG images (lossless) as a pack, a DIR tree, a .lst and a .rec."""
    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "model")
    mx.model.save_checkpoint(prefix, 0, _symbol(), {
        "fc1_weight": mx.nd.array(rng.normal(0, 0.05, size=(EMB, 3 * HW * HW))),
        "fc1_bias": mx.nd.array(rng.normal(0, 0.1, size=(EMB,)))}, {})
    encoded = [cv2.imencode(".png", img)[1].tobytes() for img in _images()]
    labels = [k // 4 for k in range(len(encoded))]
    write_bin(tmp_path / "pack.bin", encoded, [k % 2 == 0 for k in range(len(encoded) // 2)])
    root = tmp_path / "faces"
    lst_lines = []
    for k, (data, label) in enumerate(zip(encoded, labels)):
        folder = root / f"id{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{k:02d}.png").write_bytes(data)
        lst_lines.append(f"1\tfaces/id{label:02d}/img{k:02d}.png\t{label}")
    (tmp_path / "faces.lst").write_text("\n".join(lst_lines) + "\n")
    write_face_rec(tmp_path / "rec", list(zip(labels, encoded)), (HW, HW))
    return tmp_path, prefix, encoded, labels


def _run(argv, capsys=None):
    code = emb.main(argv)
    assert code == 0
    return code


def _index(path):
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return rows


def test_flip_norm_equals_the_verifier_for_dir_lst_and_rec(setup, tmp_path):
    root, prefix, encoded, labels = setup
    data_set = ver.load_bin(str(root / "pack.bin"), (HW, HW))
    model = ver.load_embedding_module(prefix, 0, mx.cpu(), 5, (HW, HW))
    result = ver.test(data_set, model, 5, nfolds=2)
    from eval.protocol import _normalize_rows
    verifier = _normalize_rows(result.embeddings_list[0] + result.embeddings_list[1])
    for source in ("faces", "faces.lst", "rec/train.rec"):
        out = str(tmp_path / f"{source.replace('/', '_')}.npy")
        _run(["--model", f"{prefix},0", "--input", str(root / source), "--output", out, "--flip",
              "--batch-size", "5", "--chunk-size", "7", "--image-size", f"{HW},{HW}", "--cpu"])
        feats = np.load(out)
        assert feats.shape == (24, EMB) and feats.dtype == np.float32
        np.testing.assert_allclose(feats, verifier, rtol=1e-5, atol=1e-6, err_msg=source)
        rows = _index(emb.index_path(out))
        assert [int(r[0]) for r in rows] == list(range(24)) and [int(r[2]) for r in rows] == labels
        assert all(r[3] == "ok" for r in rows)
    assert _index(emb.index_path(str(tmp_path / "rec_train.rec.npy")))[3][1].endswith("train.rec#4")
    assert _index(emb.index_path(str(tmp_path / "faces.npy")))[5][1].endswith(os.path.join("id01", "img05.png"))


def test_flip_and_no_norm_semantics(setup, tmp_path):
    root, prefix, encoded, _ = setup
    images = np.stack(_images())[:, :, :, ::-1].transpose(0, 3, 1, 2).astype(np.float32)  # PNG is BGR in cv2
    weight = mx.nd.load(f"{prefix}-0000.params")
    w, b = weight["arg:fc1_weight"].asnumpy(), weight["arg:fc1_bias"].asnumpy()
    plain = images.reshape(24, -1) @ w.T + b
    mirrored = images[:, :, :, ::-1].reshape(24, -1) @ w.T + b
    common = ["--model", f"{prefix},0", "--input", str(root / "faces.lst"), "--image-size", f"{HW},{HW}",
              "--batch-size", "4"]
    cases = {"raw": (["--no-norm"], plain), "flip_raw": (["--flip", "--no-norm"], plain + mirrored),
             "norm": ([], plain / np.linalg.norm(plain, axis=1, keepdims=True)),
             "flip_norm": (["--flip"], (plain + mirrored) / np.linalg.norm(plain + mirrored, axis=1, keepdims=True))}
    for name, (flags, expected) in cases.items():
        out = str(tmp_path / f"{name}.npy")
        _run(common + ["--output", out] + flags)
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-4, atol=1e-5, err_msg=name)
    norms = np.linalg.norm(np.load(str(tmp_path / "norm.npy")), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_unreadable_images_are_listed_and_skipped(setup, tmp_path, capsys):
    root, prefix, encoded, labels = setup
    (root / "faces" / "id01" / "img05.png").write_bytes(b"not an image")
    (root / "faces" / "id03" / "img13.png").write_bytes(b"")
    lst = (root / "faces.lst").read_text() + "1\tfaces/missing.png\t9\n"
    (root / "broken.lst").write_text(lst)
    out = str(tmp_path / "feats.npy")
    _run(["--model", f"{prefix},0", "--input", str(root / "broken.lst"), "--output", out,
          "--image-size", f"{HW},{HW}", "--chunk-size", "10"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["embedded"] == 22 and printed["skipped"] == 3
    assert np.load(out).shape == (22, EMB)
    rows = _index(emb.index_path(out))
    assert len(rows) == 25  # every input has a line
    skipped = {r[1].split(os.sep)[-1]: r for r in rows if r[0] == "-1"}
    assert set(skipped) == {"img05.png", "img13.png", "missing.png"}
    assert skipped["img05.png"][3].startswith("skipped: cannot decode") and skipped["img13.png"][3] == "skipped: empty file"
    assert "No such file" in skipped["missing.png"][3] and skipped["missing.png"][2] == "9"
    assert [int(r[0]) for r in rows if r[0] != "-1"] == list(range(22))
    listed = _index(emb.skipped_path(out))
    assert sorted(r[0].split(os.sep)[-1] for r in listed) == ["img05.png", "img13.png", "missing.png"]


def test_resume_after_interruption_gives_the_same_output(setup, tmp_path, monkeypatch):
    root, prefix, _, _ = setup
    argv = ["--model", f"{prefix},0", "--input", str(root / "rec" / "train.rec"), "--image-size", f"{HW},{HW}",
            "--chunk-size", "5", "--batch-size", "3", "--flip"]
    reference = str(tmp_path / "ref.npy")
    _run(argv + ["--output", reference])
    out = str(tmp_path / "feats.npy")
    real = emb._embed_chunk
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(emb, "_embed_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        emb.main(argv + ["--output", out])
    assert not os.path.exists(out) and not os.path.exists(emb.index_path(out))
    parts = sorted(os.listdir(out + ".parts"))
    assert "chunk-000001.npy" in parts and "chunk-000002.npy" not in parts
    calls["n"] = 0
    monkeypatch.setattr(emb, "_embed_chunk", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    _run(argv + ["--output", out])
    assert calls["n"] == 3  # 5 chunks, 2 finished before the kill
    np.testing.assert_array_equal(np.load(out), np.load(reference))
    assert open(emb.index_path(out)).read() == open(emb.index_path(reference)).read()
    assert not os.path.exists(out + ".parts")
    # a restart with other options is refused rather than mixed
    monkeypatch.setattr(emb, "_embed_chunk", interrupted)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        emb.main(argv + ["--output", out])
    assert emb.main(argv[:-1] + ["--output", out]) == 1  # without --flip
    assert emb.main(argv[:-1] + ["--output", out, "--restart"]) == 0


def test_errors_are_messages(setup, tmp_path, capsys):
    root, prefix, _, _ = setup
    assert emb.main(["--model", f"{prefix},0", "--input", str(root / "nope"), "--output", str(tmp_path / "x.npy")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert emb.main(["--model", f"{prefix},7", "--input", str(root / "faces"), "--output", str(tmp_path / "x.npy")]) == 1
    assert "checkpoint file not found" in capsys.readouterr().err
