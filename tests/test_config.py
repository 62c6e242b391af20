"""Config system, CLI flags, devices and the lr schedule of the training engine."""
import glob
import os

import mxnet as mx
import pytest

from recognition.config import ConfigError, load_config, load_run_config, parse_args, save_config, valid_keys
from recognition.devices import get_contexts
from recognition.engine import build_lr_scheduler

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_base_defaults_are_insightface_head():
    cfg = load_config()
    assert (cfg.network, cfg.loss, cfg.per_batch_size, cfg.lr, cfg.wd, cfg.mom) == ("r100", "arcface", 128, 0.1,
                                                                                  0.0005, 0.9)
    assert cfg.lr_steps == [100000, 160000, 220000] and cfg.ckpt == 3 and cfg.verbose == 2000


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                                        if os.path.basename(p) not in ("__init__.py", "base.py")))
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert set(cfg) == set(valid_keys())


def test_preset_chain_and_overrides(tmp_path):
    (tmp_path / "parent.py").write_text('config = {"network": "r50", "lr": 0.05, "emb_size": 256}\n')
    (tmp_path / "child.py").write_text('base = "parent.py"\nconfig = {"lr": 0.01}\n')
    cfg = load_config(str(tmp_path / "child.py"), overrides={"emb_size": "64"})
    assert (cfg.network, cfg.lr, cfg.emb_size) == ("r50", 0.01, 64)


def test_unknown_key_names_it_and_the_closest_key(tmp_path):
    (tmp_path / "typo.py").write_text('config = {"per_batch_sise": 64}\n')
    with pytest.raises(ConfigError, match=r"typo.py.*unknown config key 'per_batch_sise'.*did you mean "
                                          r"'per_batch_size'"):
        load_config(str(tmp_path / "typo.py"))


@pytest.mark.parametrize("overrides, pattern", [
    ({"lr": "fast"}, r"'lr' must be a number, got 'fast'"),
    ({"ckpt": 5}, r"'ckpt' = 5: must be one of \[0, 1, 2, 3\]"),
    ({"lr_steps": [300, 200]}, r"'lr_steps'.*strictly increasing"),
    ({"loss": "arcfase"}, r"'loss'.*did you mean 'arcface'"),
    ({"ctx": "gpu:2"}, r"'ctx'.*'cpu' or 'cpu:N'"),
    ({"image_shape": [112, 96, 3]}, r"'image_shape'.*square"),
    ({"loss": "triplet", "per_batch_size": 64}, r"divisible by 3"),
    ({"ce_loss": "maybe"}, r"'ce_loss' must be a boolean"),
])
def test_bad_values_are_errors_naming_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=overrides)


def test_flags_map_to_config_keys():
    cfg = parse_args(["--network", "r50", "--per-batch-size", "64", "--lr-steps", "10,20", "--target", "lfw,cfp_fp",
                      "--margin-m", "0.4", "--margin-s", "30", "--data-dir", "/data/x", "--ckpt", "2",
                      "--max-steps", "7", "--ctx", "cpu:2", "--version-multiplier", "0.25", "--set", "seed=3"])
    assert (cfg.network, cfg.per_batch_size, cfg.lr_steps, cfg.val_targets) == ("r50", 64, [10, 20],
                                                                               ["lfw", "cfp_fp"])
    assert (cfg.loss_m2, cfg.loss_s, cfg.dataset_path, cfg.ckpt, cfg.max_steps) == (0.4, 30.0, "/data/x", 2, 7)
    assert (cfg.ctx, cfg.net_multiplier, cfg.seed) == ("cpu:2", 0.25, 3)


def test_legacy_loss_type_goes_through_the_symbols_table():
    cfg = parse_args(["--loss-type", "4", "--margin-m", "0.3", "--easy-margin", "1"])
    assert (cfg.loss, cfg.loss_m1, cfg.loss_m2, cfg.loss_m3, cfg.easy_margin) == ("arcface_v1", 1.0, 0.3, 0.0, 1)
    cfg = parse_args(["--loss-type", "2", "--margin-m", "0.35"])
    assert (cfg.loss, cfg.loss_m2, cfg.loss_m3) == ("cosface", 0.0, 0.35)
    with pytest.raises(ConfigError, match="--loss-type 9"):
        parse_args(["--loss-type", "9"])


def test_precedence_extra_defaults_preset_set_flags(tmp_path):
    (tmp_path / "p.py").write_text('config = {"lr": 0.05, "wd": 0.001}\n')
    cfg = parse_args(["--config", str(tmp_path / "p.py"), "--set", "wd=0.002", "--set", "mom=0.5", "--mom", "0.0"],
                     extra_defaults={"lr": 0.5, "wd": 0.1, "emb_size": 64})
    assert (cfg.lr, cfg.wd, cfg.mom, cfg.emb_size) == (0.05, 0.002, 0.0, 64)
    with pytest.raises(ConfigError, match="--set 'wd'"):
        parse_args(["--set", "wd"])


@pytest.mark.parametrize("argv, expected", [
    # the named head fills its margins (HEAD generate_config), instead of keeping base's arcface m2 = 0.5
    (["--loss", "cosface"], {"loss_m1": 1.0, "loss_m2": 0.0, "loss_m3": 0.35, "loss_s": 64.0}),
    (["--loss", "combined"], {"loss_m1": 1.0, "loss_m2": 0.3, "loss_m3": 0.2}),
    (["--loss", "sphereface"], {"loss_m1": 1.5, "loss_m2": 0.0, "loss_m3": 0.0}),
    # an explicit margin flag still wins over the preset
    (["--loss", "cosface", "--margin-b", "0.4"], {"loss_m2": 0.0, "loss_m3": 0.4}),
    (["--loss", "arcface", "--margin-s", "32"], {"loss_s": 32.0, "loss_m2": 0.5}),
    # the named network fills its embedding size, head and blocks unless given
    (["--network", "y2"], {"emb_size": 256, "net_output": "GDC", "net_blocks": [2, 8, 16, 4]}),
    (["--network", "y1", "--emb-size", "64"], {"emb_size": 64, "net_output": "GDC"}),
    (["--network", "r50"], {"emb_size": 512, "net_output": "E"}),
])
def test_named_network_and_loss_presets_fill_unset_keys(argv, expected):
    cfg = parse_args(argv)
    assert {k: cfg[k] for k in expected} == expected


def test_named_presets_do_not_override_preset_files(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("config = {'loss': 'cosface', 'loss_m3': 0.25, 'network': 'y1', 'emb_size': 32}\n")
    cfg = load_config(str(preset))
    assert (cfg.loss_m2, cfg.loss_m3, cfg.emb_size, cfg.net_output) == (0.0, 0.25, 32, "GDC")


def test_extra_flags_added_by_another_trainer():
    from recognition.config import build_arg_parser
    parser = build_arg_parser()
    parser.add_argument("--triplet-alpha", dest="triplet_alpha", type=float, default=None)
    cfg = parse_args(["--triplet-alpha", "0.2"], parser=parser)
    assert cfg.triplet_alpha == 0.2


def test_resume_starts_from_the_saved_config(tmp_path):
    cfg = load_config(overrides={"network": "r18", "lr": 0.01})
    save_config(cfg, tmp_path)
    resumed = parse_args(["--resume", str(tmp_path), "--max-steps", "9"])
    assert (resumed.network, resumed.lr, resumed.max_steps, resumed.resume) == ("r18", 0.01, 9, str(tmp_path))
    with pytest.raises(ConfigError, match="no config.json"):
        load_run_config(tmp_path / "elsewhere")


def test_devices_without_cuda_visible_devices():
    assert get_contexts(environ={}) == [mx.cpu()]
    assert get_contexts(environ={"CUDA_VISIBLE_DEVICES": "0,1"}, num_gpus=0) == [mx.cpu()]
    assert get_contexts(environ={"CUDA_VISIBLE_DEVICES": "0,1"}, num_gpus=2) == [mx.gpu(0), mx.gpu(1)]
    assert get_contexts(ctx="cpu:2", environ={}) == [mx.cpu(0), mx.cpu(1)]
    assert get_contexts(gpus="1", num_gpus=2) == [mx.gpu(1)]
    with pytest.raises(ValueError, match=r"--gpus 0,1: GPU id\(s\) \[0, 1\] not available.*--ctx cpu"):
        get_contexts(gpus="0,1", num_gpus=0)


def _upstream_lrs(base_lr, lr_steps, num_batches):
    """insightface's loop: the update of global batch b uses `lr`; after its callback, `lr *= 0.1` if b in steps."""
    lr, used = base_lr, []
    for mbatch in range(1, num_batches + 1):
        used.append(lr)
        if mbatch in lr_steps:
            lr *= 0.1
    return used


def test_lr_schedule_matches_upstream_rule():
    cfg = load_config(overrides={"lr": 0.1, "lr_steps": [3, 7, 8]})
    sched = build_lr_scheduler(cfg)
    ours = [sched(update) for update in range(1, 13)]  # MXNet passes num_update = 1, 2, ... to the scheduler
    assert ours == pytest.approx(_upstream_lrs(0.1, [3, 7, 8], 12), rel=1e-12)


def test_warmup_is_linear_then_steps():
    cfg = load_config(overrides={"lr": 0.1, "lr_steps": [6], "warmup_steps": 4})
    sched = build_lr_scheduler(cfg)
    assert [sched(u) for u in range(0, 8)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01])
    assert build_lr_scheduler(load_config(overrides={"lr_steps": []})) is None
