"""``python -m recognition.train_triplet``: flags/defaults/presets, errors, end-to-end from a softmax checkpoint."""
import glob
import json
import os

import numpy as np
import pytest

from recognition.config import ConfigError, load_config
from recognition.engine import fit
from recognition.train_triplet import main, parse_triplet_args
from tests.data_fixtures import make_synthetic_dataset

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_trainer_defaults_are_insightface_triplet_defaults():
    cfg = parse_triplet_args([])
    assert (cfg.loss, cfg.per_batch_size, cfg.lr, cfg.mom, cfg.lr_steps) == ("triplet", 60, 0.05, 0.0, [])
    assert (cfg.images_per_identity, cfg.triplet_bag_size, cfg.triplet_alpha, cfg.triplet_max_ap) == (5, 7200, 0.3, 0)
    assert parse_triplet_args(["--loss", "atriplet"]).triplet_alpha == 0.35
    assert parse_triplet_args(["--loss", "atriplet", "--triplet-alpha", "0.2"]).triplet_alpha == 0.2
    # OLD train_triplet --loss-type: 1 triplet, 2 atriplet (not train_softmax's codes).
    legacy = parse_triplet_args(["--loss-type", "2", "--per-batch-size", "150", "--lr", "0.005"])
    assert (legacy.loss, legacy.triplet_alpha, legacy.per_batch_size, legacy.lr) == ("atriplet", 0.35, 150, 0.005)
    flags = parse_triplet_args(["--images-per-identity", "4", "--triplet-bag-size", "3600", "--triplet-max-ap", "1.5"])
    assert (flags.images_per_identity, flags.triplet_bag_size, flags.triplet_max_ap) == (4, 3600, 1.5)


@pytest.mark.parametrize("preset", sorted(glob.glob(os.path.join(CONFIGS, "triplet*.py"))))
def test_presets_are_consistent(preset):
    cfg = parse_triplet_args(["--config", preset])
    assert cfg.loss in ("triplet", "atriplet")
    assert cfg.per_batch_size % 3 == 0 and cfg.triplet_bag_size % cfg.per_batch_size == 0
    assert cfg.images_per_identity >= 2 and 0 < cfg.triplet_alpha <= 1
    if "emore" in preset:  # insightface's own recipes keep its alphas
        assert cfg.triplet_alpha == (0.35 if cfg.loss == "atriplet" else 0.3)


@pytest.mark.parametrize("argv, match", [
    (["--loss", "arcface"], "train_triplet trains"),
    (["--per-batch-size", "64", "--triplet-bag-size", "6400"], "divisible by 3"),
    (["--per-batch-size", "60", "--triplet-bag-size", "7000"], "multiple of the global batch 60"),
    (["--per-batch-size", "30", "--ctx", "cpu:2", "--triplet-bag-size", "150"], "multiple of the global batch 60"),
    (["--images-per-identity", "1"], "must be >= 2"),
    (["--loss-type", "4"], "takes 1 .triplet. or 2"),
])
def test_bad_configs(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_triplet_args(argv)


def test_cli_error_exit_code(tmp_path, capsys):
    assert main(["--per-batch-size", "60", "--triplet-bag-size", "70", "--data-dir", str(tmp_path)]) == 1
    assert "triplet_bag_size" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_from_softmax_checkpoint(tmp_path, capsys):
    side = 32
    data_dir = make_synthetic_dataset(tmp_path, identities=8, images_per_identity=6, image_size=side,
                                      holdout_identities=4, pack_pairs=40)
    common = dict(network="r18", net_multiplier=0.25, emb_size=16, image_shape=[side, side, 3], dataset_path=data_dir,
                  val_targets=["lfw"], data_workers=1, seed=0)
    softmax = fit(load_config(overrides=dict(common, loss="softmax", per_batch_size=12, max_steps=2, verbose=100,
                                             ckpt=3, prefix=str(tmp_path / "softmax" / "model"))))
    assert os.path.isfile(softmax.prefix + "-0000.params")

    prefix = str(tmp_path / "triplet" / "model")
    argv = ["--network", "r18", "--version-multiplier", "0.25", "--emb-size", "16", "--image-size", f"{side},{side}",
            "--data-dir", data_dir, "--target", "lfw", "--data-workers", "1", "--seed", "0",
            "--per-batch-size", "6", "--ctx", "cpu:2", "--triplet-bag-size", "36", "--triplet-alpha", "0.5",
            "--lr", "0.01", "--max-steps", "4", "--verbose", "2", "--frequent", "1",
            "--pretrained", f"{softmax.prefix},0", "--prefix", prefix]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "triplets per bag" in out and "finished at global step 4" in out

    run_dir = os.path.dirname(prefix)
    log = open(os.path.join(run_dir, "training.log"), encoding="utf-8").read()
    assert "found triplets" in log and "lossvalue=" in log
    assert "[lfw][2]Accuracy-Flip" in log and "[lfw][4]Accuracy-Flip" in log   # engine verification ran
    assert "not in the checkpoint, initialised" not in log                   # every weight came from softmax
    bags = json.load(open(os.path.join(run_dir, "triplet_bags.json"), encoding="utf-8"))
    assert bags and all(b["images"] == 36 and 0 < b["triplets"] <= b["pairs"] for b in bags)
    assert os.path.isfile(prefix + "-0000.params") and os.path.isfile(prefix + "-symbol.json")
    config = json.load(open(os.path.join(run_dir, "config.json"), encoding="utf-8"))
    assert (config["loss"], config["triplet_bag_size"], config["ctx"]) == ("triplet", 36, "cpu:2")

    import mxnet as mx
    _, before, _ = mx.model.load_checkpoint(softmax.prefix, 0)
    _, after, _ = mx.model.load_checkpoint(prefix, 0)
    assert "fc7_weight" not in after
    changed = [k for k in after if not np.array_equal(after[k].asnumpy(), before[k].asnumpy())]
    assert "pre_fc1_weight" in changed
