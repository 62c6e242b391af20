"""The engine's dataset resolution: insightface's iterator needs only train.rec/.idx, so does the engine."""
import os

import pytest

from data_fixtures import make_synthetic_dataset
from recognition.config import ConfigError, load_config
from recognition.engine import resolve_run_config


def test_num_classes_counted_from_identity_records_without_property(tmp_path):
    data = make_synthetic_dataset(tmp_path, identities=5, images_per_identity=3, image_size=32, holdout_identities=0)
    os.remove(os.path.join(data, "property"))
    cfg = load_config(overrides={"dataset_path": data, "prefix": str(tmp_path / "run" / "model"),
                                 "image_shape": "32,32,3"})
    resolved, _ = resolve_run_config(cfg)
    assert resolved.num_classes == 5


def test_no_property_and_no_rec_names_the_fix(tmp_path):
    cfg = load_config(overrides={"dataset_path": str(tmp_path), "prefix": str(tmp_path / "run" / "model")})
    with pytest.raises(ConfigError, match="no property file at .*give --num-classes"):
        resolve_run_config(cfg)


def test_pack_with_fewer_pairs_than_folds_fails_at_start_up(tmp_path):
    from eval.protocol import FoldError
    from iterators.formats.bin_pack import read_bin, write_bin
    from recognition.engine import load_verification_sets
    data = make_synthetic_dataset(tmp_path, identities=4, images_per_identity=3, image_size=32, pack_pairs=20)
    bins, issame = read_bin(os.path.join(data, "lfw.bin"))
    write_bin(os.path.join(data, "lfw.bin"), bins[:14], issame[:7])
    cfg = load_config(overrides={"dataset_path": data, "val_targets": "lfw", "image_shape": "32,32,3"})
    with pytest.raises(FoldError, match=r"lfw\.bin.*7 pairs"):
        load_verification_sets(cfg)
