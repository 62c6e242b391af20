"""Reliability and security regressions: every test reproduces a failure that happened before its fix.

Data loss (full disk, NaN checkpoints, undecodable datasets, copied runs, two trainings in one directory,
leftovers of kills), code execution through ``optimizer.states``, paths escaping ``--output``, file modes, and one
clear line (no traceback) for every bad input. Tiny nets (one FullyConnected layer) on 8x8 synthetic faces keep
each training to a second or two; the fault-injection tests (SIGKILL at random moments, a file-size limit during a
save) run training in subprocesses and are marked slow.
"""
import json
import logging
import os
import pickle
import random
import re
import resource
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time

import mxnet as mx
import numpy as np
import pytest

from data_fixtures import make_synthetic_dataset
from iterators import FaceImageIter
from iterators.formats import atomic
from iterators.formats.bin_pack import write_bin
from iterators.formats.recordio import (FaceRecordReader, RecordFormatError, RecordLabelError, read_index,
                                        read_property, write_face_rec)
from recognition import checkpoints as ckpts
from recognition import hooks
from recognition.config import ConfigError, load_config, load_run_config, parse_args
from recognition.engine import fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE, EMB, IDENTITIES, PER_ID = 8, 6, 8, 6


@pytest.fixture(autouse=True)
def _fresh_root_logger():
    """Entry points call logging.basicConfig on the captured stderr of their test: drop those handlers after it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("reliability"), identities=IDENTITIES,
                                  images_per_identity=PER_ID, image_size=SIDE, pack_pairs=20)


def tiny_symbol(emb=EMB):
    data, label = mx.sym.var("data"), mx.sym.var("softmax_label")
    fc1 = mx.sym.FullyConnected(mx.sym.flatten(data * 0.0078125), num_hidden=emb, name="fc1")
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=IDENTITIES, name="fc7")
    return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7, label, normalization="valid",
                                                                     name="softmax")])


class Acc(mx.metric.EvalMetric):
    """preds[1] argmax vs labels (finite even when fc7 holds NaN, so only the parameter check can catch it)."""

    def __init__(self):
        super().__init__("acc")

    def update(self, labels, preds):
        pred = preds[1].asnumpy().argmax(axis=1)
        self.sum_metric += float((pred == labels[0].asnumpy()).sum())
        self.num_inst += len(pred)


def config(run, data_dir, **overrides):
    base = dict(network="r18", image_shape=[SIDE, SIDE, 3], dataset_path=str(data_dir), prefix=str(run / "model"),
                per_batch_size=8, lr=0.1, wd=0.0005, mom=0.9, frequent=2, verbose=2, ckpt=2, ckpt_embedding=False,
                seed=0, data_workers=1, val_targets=[], max_steps=4)
    base.update(overrides)
    return load_config(overrides=base)


def tmp_leftovers(root):
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith(".tmp-")]


# ============================================================================ 1. full disk / file size limit

FSIZE_SCRIPT = textwrap.dedent("""
    import os, resource, signal, sys
    import mxnet as mx
    from iterators.formats.atomic import AtomicWriteError, atomic_write_text
    from recognition import checkpoints as ckpts
    path, run_dir = sys.argv[1], sys.argv[2]
    arg = {"fc1_weight": mx.nd.full((64, 512), 1.0)}
    ckpts.save_params(path, arg, {})                                   # the previous good checkpoint
    ckpts.save_resume_state(run_dir, {"global_step": 1}, arg, {}, lambda p: ckpts.write_state_tree(p, {}))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                      # writes fail with EFBIG instead of a kill
    limit = os.path.getsize(path) - 100                                # the final flush of mx.nd.save fails
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for name, call in [("params", lambda: ckpts.save_params(path, {"fc1_weight": mx.nd.full((64, 512), 2.0)}, {})),
                       ("resume", lambda: ckpts.save_resume_state(run_dir, {"global_step": 2},
                                                                  {"fc1_weight": mx.nd.full((64, 512), 2.0)}, {},
                                                                  lambda p: ckpts.write_state_tree(p, {}))),
                       ("text", lambda: atomic_write_text(path + ".json", "x" * (limit + 10)))]:
        try:
            call()
            print(name, "returned")
        except AtomicWriteError as exc:
            print(name, "error", exc)
""")


def test_file_size_limit_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """MXNet's stream drops the error of its last flush: under ``ulimit -f`` ``mx.nd.save`` returned normally with
    a truncated file that then replaced the good one. Now the file is re-loaded before the rename."""
    script = tmp_path / "fsize.py"
    script.write_text(FSIZE_SCRIPT)
    path, run_dir = tmp_path / "model-0001.params", tmp_path / "run"
    out = subprocess.run([sys.executable, str(script), str(path), str(run_dir)], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    for name in ("params", "resume", "text"):
        assert lines[name].startswith("error cannot write"), (name, lines[name])
    assert "file size limit" in lines["params"] and str(path) in lines["params"]
    assert "EFBIG" in lines["text"]
    assert (mx.nd.load(str(path))["arg:fc1_weight"].asnumpy() == 1.0).all()  # the previous checkpoint loads
    state, arg, _, _ = ckpts.load_resume_state(run_dir)
    assert state["global_step"] == 1 and (arg["fc1_weight"].asnumpy() == 1.0).all()
    assert tmp_leftovers(tmp_path) == [] and not os.path.exists(str(path) + ".json")


# ============================================================================ 2. NaN checkpoints


class PoisonFc7(hooks.Hook):
    """Writes NaN into fc7_weight after step ``at`` (embedding and metric stay finite)."""

    def __init__(self, at):
        self.at = at

    def after_step(self, trainer):
        if trainer.state.global_step == self.at:
            arg, aux = trainer.module.get_params()
            arg["fc7_weight"][:] = np.nan
            trainer.module.set_params(arg, aux)


def test_non_finite_parameters_are_never_saved_and_finite_states_never_pruned(tmp_path, dataset):
    """Before: the NaN weights were saved as resume states/checkpoints and the two finite ones pruned."""
    with pytest.raises(hooks.NonFiniteError) as err:
        fit(config(tmp_path, dataset, max_steps=20, verbose=2), symbol=tiny_symbol(), hooks=[PoisonFc7(3)],
            metrics=[Acc()])
    message = str(err.value)
    assert re.search(r"parameter arg:fc[17]_weight holds NaN/inf at global step 4", message), message
    assert "step-0000000002" in message
    states = ckpts.list_resume_states(tmp_path)
    assert [os.path.basename(p) for p in states] == ["step-0000000002"]
    _, arg, _, _ = ckpts.load_resume_state(tmp_path)
    assert all(np.isfinite(v.asnumpy()).all() for v in arg.values())
    assert not (tmp_path / "model-0002.params").exists()  # the verification-2 checkpoint was not written


def test_non_finite_verification_result_stops_training():
    """Before: ``XNorm: nan`` was logged and the saver went on to save the NaN model as the best."""
    published = []

    class Trainer:
        state = hooks.TrainingState(global_step=4)
        module = metrics_log = None

        def publish_verification(self, results):
            published.append(results)

    nan_test = lambda data, module, batch, nfolds: (0.5, 0.0, 0.5, 0.0, float("nan"), None)  # noqa: E731
    hook = hooks.PeriodicVerification([("lfw", None)], 8, 2, nan_test)
    with pytest.raises(hooks.NonFiniteError, match=r"non-finite verification result at global step 4: \[lfw\] "
                                                  r"xnorm=nan"):
        hook.after_step(Trainer())
    assert published == []


def test_damaged_newest_resume_state_falls_back_to_the_previous_one(tmp_path, caplog):
    arg = {"w": mx.nd.ones((4,))}
    for step in (2, 4):
        ckpts.save_resume_state(tmp_path, {"global_step": step}, arg, {}, lambda p: ckpts.write_state_tree(p, {}))
    newest = tmp_path / "resume" / "step-0000000004" / "full.params"
    newest.write_bytes(newest.read_bytes()[:40])
    with caplog.at_level(logging.WARNING):
        resume = ckpts.load_resume_state(tmp_path)
    assert resume.state["global_step"] == 2
    assert f"resume state {newest.parent} is damaged" in caplog.text and "full.params" in caplog.text
    (tmp_path / "resume" / "step-0000000002" / "state.json").write_text("{")
    with pytest.raises(ValueError, match="no loadable resume state.*state.json: not valid JSON"):
        ckpts.load_resume_state(tmp_path)


# ============================================================================ 3. undecodable dataset


def test_dataset_of_undecodable_records_fails_naming_file_and_count(tmp_path, caplog):
    """Before: every record was skipped with a warning, every epoch was empty, and 10,000 of them 'trained'."""
    data = tmp_path / "bad"
    write_face_rec(data, [(i // 4, b"not an image %d" % i) for i in range(32)], image_size=(SIDE, SIDE))
    cfg = config(tmp_path / "run", data, max_steps=0, end_epoch=10000)
    tic = time.time()
    with caplog.at_level(logging.WARNING), pytest.raises(RecordFormatError) as err:
        fit(cfg, symbol=tiny_symbol())
    assert time.time() - tic < 60
    assert f"{data}/train.rec: no batch of 8 images in epoch 0: 32 of 32 records failed to decode" in str(err.value)
    skips = [r for r in caplog.records if "skipped (corrupt" in r.getMessage()]
    assert 2 <= len(skips) <= 5 and "32 skipped so far" not in caplog.text  # rate-limited
    assert "10 skipped so far" in caplog.text


# ============================================================================ 4. copied run directory


def test_resume_of_a_copied_run_writes_only_into_the_copy(tmp_path, dataset):
    original, copy = tmp_path / "original", tmp_path / "copy"
    fit(config(original, dataset, max_steps=2), symbol=tiny_symbol())
    saved = json.loads((original / "config.json").read_text())
    assert saved["prefix"] == "model" and saved["_relative_to_run_dir"] == ["prefix"]
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    before = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, files in os.walk(original) for p in files}
    listing = sorted(os.listdir(original))
    cfg = load_run_config(str(copy), {"max_steps": 4})
    assert cfg.prefix == str(copy / "model")
    result = fit(cfg, symbol=tiny_symbol())
    assert result.global_step == 4 and result.run_dir == str(copy)
    assert sorted(os.listdir(original)) == listing
    after = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, files in os.walk(original) for p in files}
    assert after == before
    assert (copy / "resume" / "step-0000000004").is_dir()


def test_old_config_with_an_absolute_prefix_is_rebased_into_the_resumed_directory(tmp_path, dataset, caplog):
    run = tmp_path / "old"
    fit(config(run, dataset, max_steps=2), symbol=tiny_symbol())
    saved = json.loads((run / "config.json").read_text())
    saved.pop("_relative_to_run_dir")
    saved["prefix"] = "/somewhere/else/model"  # what older versions stored
    (run / "config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        cfg = load_run_config(str(run))
    assert cfg.prefix == str(run / "model") and "outside the run directory" in caplog.text


# ============================================================================ 5./6. run lock and leftovers

HOLD_LOCK = "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n" \
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'%d\\n' % os.getpid())\nprint('locked', flush=True)\n" \
            "time.sleep(60)\n"


@pytest.fixture
def lock_holder(tmp_path):
    """A process holding ``tmp_path/run/.lock`` (as a running training does)."""
    (tmp_path / "run").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run" / ".lock")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_second_training_in_a_run_directory_fails_at_once_naming_the_pid(tmp_path, dataset, lock_holder):
    """Before: both trainings wrote the same checkpoints and resume states."""
    tic = time.time()
    with pytest.raises(ckpts.RunLockedError, match=rf"in use by another training \(PID {lock_holder.pid}"):
        fit(config(tmp_path / "run", dataset), symbol=tiny_symbol())
    assert time.time() - tic < 10
    assert not (tmp_path / "run" / "resume").exists() and not (tmp_path / "run" / "config.json").exists()


def test_lock_start_up_removes_temporaries_of_dead_writers_only(tmp_path, lock_holder):
    run = tmp_path / "run"
    lock_holder.kill()
    lock_holder.wait()
    (run / "resume" / "step-0000000005").mkdir(parents=True)  # a killed directory rename: empty step dir
    dead = [run / ".tmp-999999-abcmodel-0001.params", run / "resume" / ".tmp-old-step"]
    dead[0].write_bytes(b"half")
    dead[1].mkdir()
    live = run / f".tmp-{os.getpid()}-xyzconfig.json"  # a writer that is still running (this process)
    live.write_bytes(b"")
    with ckpts.RunDirLock(run) as lock:
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ckpts.RunLockedError):
            ckpts.RunDirLock(run).acquire()
    assert not any(p.exists() for p in dead) and not (run / "resume" / "step-0000000005").exists()
    assert live.exists() and lock._fd is None
    ckpts.RunDirLock(run).acquire().release()  # released: a new training may start


# ============================================================================ 7. optimizer.states cannot execute code


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _module_with_momentum():
    module = mx.mod.Module(tiny_symbol(), data_names=("data",), label_names=("softmax_label",))
    module.bind(data_shapes=[("data", (8, 3, SIDE, SIDE))], label_shapes=[("softmax_label", (8,))])
    module.init_params()
    module.init_optimizer(optimizer=mx.optimizer.SGD(learning_rate=0.1, momentum=0.9))
    batch = mx.io.DataBatch([mx.nd.ones((8, 3, SIDE, SIDE))], [mx.nd.zeros((8,))])
    module.forward_backward(batch)
    module.update()
    return module


def test_crafted_optimizer_states_pickle_is_refused_and_never_runs(tmp_path):
    """Before: ``--resume`` fed ``resume/step-*/optimizer.states`` to MXNet's unrestricted ``pickle.loads``."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "optimizer.states"
    evil.write_bytes(pickle.dumps({0: Payload(marker)}, protocol=2))
    module = _module_with_momentum()
    with pytest.raises(ValueError, match="refusing to load this pickled optimizer state .*os.system|posix.system"):
        ckpts.load_optimizer_states(module, str(evil))
    assert not marker.exists()
    # a resume state carrying it is skipped as damaged, the payload still never runs
    run = tmp_path / "run"
    ckpts.save_resume_state(run, {"global_step": 1}, {"w": mx.nd.ones((2,))}, {},
                            lambda p: open(p, "wb").write(evil.read_bytes()))
    with pytest.raises(ValueError, match="refusing"):
        ckpts.load_resume_state(run)
    assert not marker.exists()


def test_optimizer_states_round_trip_without_pickle_and_old_mxnet_states_still_load(tmp_path):
    module = _module_with_momentum()
    path = str(tmp_path / "optimizer.states")
    ckpts.save_optimizer_states(module, path)
    with open(path, "rb") as f:
        assert f.read(1) != b"\x80"  # an NDArray file, not a pickle
    momentum = {k: v.asnumpy() for k, v in module._updater.states.items()}
    fresh = _module_with_momentum()
    ckpts.load_optimizer_states(fresh, path)
    for key, value in momentum.items():
        np.testing.assert_array_equal(fresh._updater.states[key].asnumpy(), value)
    legacy = str(tmp_path / "legacy.states")
    module.save_optimizer_states(legacy)  # MXNet's own pickle of older runs: read with the restricted unpickler
    states = ckpts.read_state_tree(legacy)
    for key, value in momentum.items():
        np.testing.assert_array_equal(states[key].asnumpy(), value)


# ============================================================================ 8. build_rec --prefix


def test_build_rec_prefix_cannot_escape_the_output_directory(tmp_path, capsys):
    from iterators.tools import build_rec
    faces = tmp_path / "faces" / "a"
    faces.mkdir(parents=True)
    import cv2
    cv2.imwrite(str(faces / "1.png"), np.zeros((SIDE, SIDE, 3), np.uint8))
    out = tmp_path / "deep" / "out"
    rc = build_rec.main(["--input", str(tmp_path / "faces"), "--output", str(out), "--prefix", "../../x",
                         "--image-size", f"{SIDE},{SIDE}"])
    assert rc == 1
    assert "prefix '../../x' must be a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "x.rec").exists() and not list(tmp_path.glob("x.*"))


# ============================================================================ 9. file modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_file_modes_are_private_for_data_and_checkpoints_and_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        data = tmp_path / "data"
        write_face_rec(data, [(0, b"x"), (1, b"y")], image_size=(SIDE, SIDE))
        write_bin(data / "t.bin", [b"a", b"b"], [True])
        run = tmp_path / "run"
        ds = make_synthetic_dataset(tmp_path, identities=IDENTITIES, images_per_identity=PER_ID, image_size=SIDE,
                                    holdout_identities=0)
        fit(config(run, ds, max_steps=4), symbol=tiny_symbol())
        from eval.verification import _write_json
        _write_json(str(tmp_path / "results.json"), {"acc": 1})
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)
    private, private_dir, public = 0o600 & ~umask, 0o700 & ~umask, 0o644 & ~umask
    for p in [data / "train.rec", data / "train.idx", data / "property", run / "config.json",
              run / "model-symbol.json", run / "model-0001.params", run / "model-0000.params",
              tmp_path / "results.json"]:
        assert mode(p) == private, (p, oct(mode(p)))
    step = run / "resume" / "step-0000000004"
    assert mode(step) == private_dir
    for name in os.listdir(step):
        assert mode(step / name) == private, name
    assert mode(data / "t.bin") == public and mode(run / "training_curves.png") == public


# ============================================================================ 10. one line per bad input


def _broken_dataset(tmp_path, dataset, what):
    bad = tmp_path / f"bad-{what}"
    subprocess.run(["cp", "-a", dataset, str(bad)], check=True)
    if what == "property":
        (bad / "property").write_text("8,8,8,8\n")
    elif what == "pack":
        (bad / "lfw.bin").write_bytes(b"\x80\x04garbage")
    return str(bad)


def _one_line(err):
    """The single error line of stderr (INFO log lines may precede it), and no traceback."""
    lines = [ln for ln in err.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", ["RecordFormatError", "PackFormatError", "FileNotFoundError", "ValueError",
                                  "PermissionError"])
def test_train_softmax_reports_bad_input_in_one_line(tmp_path, dataset, capsys, monkeypatch, case):
    """Before: these escaped from train_softmax as tracebacks."""
    from recognition import train_softmax
    args = ["--network", "r18", "--data-dir", dataset, "--per-batch-size", "8", "--max-steps", "1",
            "--prefix", str(tmp_path / "run" / "model"), "--target", "lfw", "--verbose", "1"]
    if case == "RecordFormatError":
        args[3] = _broken_dataset(tmp_path, dataset, "property")
    elif case == "PackFormatError":
        args[3] = _broken_dataset(tmp_path, dataset, "pack")
    elif case == "FileNotFoundError":
        args += ["--pretrained", str(tmp_path / "missing") + ",1"]
    elif case == "ValueError":
        args += ["--lr-steps", "x"]  # argparse: exits 2 with a usage line
    elif case == "PermissionError":
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "config.json"))
        monkeypatch.setattr(train_softmax, "fit", denied)
    if case == "ValueError":
        with pytest.raises(SystemExit) as exit_:
            train_softmax.main(args)
        assert exit_.value.code == 2
        return
    logging.getLogger().handlers[:] = []
    assert train_softmax.main(args) == 1
    line = _one_line(capsys.readouterr().err)
    expected = {"RecordFormatError": "property line 1", "PackFormatError": "lfw.bin",
                "FileNotFoundError": "missing-0001.params", "PermissionError": "Permission denied"}[case]
    assert line.startswith("python -m recognition.train_softmax: error:") and expected in line, line


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    from iterators.tools import build_rec
    assert build_rec.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "nothing" in err
    assert build_rec.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("entry, argv, expected", [
    ("recognition.train_triplet", ["--data-dir", "{tmp}/none", "--pretrained", "{tmp}/m,1", "--per-batch-size", "6"],
     "m-0001.params"),
    ("recognition.demo", ["--output", "{tmp}/file", "--cache-dir", "{tmp}/file"], "file"),
    ("eval.verification", ["--model", "{tmp}/m,1", "--cpu"], "m"),
    ("eval.build_bin", ["--image-folder", "{tmp}/none", "--output", "{tmp}/x.bin"], "none"),
    ("iterators.tools.build_rec", ["--input", "{tmp}/none", "--output", "{tmp}/out"], "none"),
    ("iterators.tools.datasets", ["synthetic", "--identities", "2", "--images-per-identity", "1", "--output",
                                  "{tmp}/file"], "file"),
])
def test_every_entry_point_reports_errors_in_one_line(tmp_path, capsys, entry, argv, expected):
    import importlib
    (tmp_path / "file").write_text("not a directory")
    module = importlib.import_module(entry)
    logging.getLogger().handlers[:] = []
    rc = module.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 1
    line = _one_line(capsys.readouterr().err)
    assert ("error:" in line) and expected in line, line


def test_dist_sync_without_a_launcher_says_how_to_launch(tmp_path, dataset, capsys, monkeypatch):
    from recognition import train_softmax
    for var in ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER"):
        monkeypatch.delenv(var, raising=False)
    logging.getLogger().handlers[:] = []
    rc = train_softmax.main(["--data-dir", dataset, "--kvstore", "dist_sync", "--prefix", str(tmp_path / "r" / "m")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "DMLC_ROLE" in line and "python -m recognition.launch" in line, line


# ============================================================================ 11. validation gaps


@pytest.mark.parametrize("argv, match", [
    (["--lr", "inf"], "'lr' = inf: must be a finite number"),
    (["--set", "wd=nan"], "'wd' = nan: must be a finite number"),
    (["--margin-m", "nan"], "'loss_m2' = nan: must be a finite number"),
    (["--margin-m", "-0.1"], "'loss_m2' = -0.1: a margin must be >= 0"),
    (["--config", "x.json"], "config file not found"),
    (["--config", "{tmp}/run.json"], "a preset is a Python file"),
    (["--config", "{tmp}/broken.py"], "broken.py line 1: .*a preset must be valid Python"),
])
def test_config_values_that_used_to_fail_deep_inside_mxnet(tmp_path, argv, match):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "broken.py").write_text("config = {\n")
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])


def test_explicit_image_size_must_match_property(dataset):
    """Before: training took property's size (and the iterator silently resized) whatever --image-size said."""
    with pytest.raises(ConfigError, match=r"--image-size 112,112 but .*property says the images are 8x8"):
        parse_args(["--data-dir", dataset, "--image-size", "112,112"])
    assert parse_args(["--data-dir", dataset, "--image-size", f"{SIDE},{SIDE}"]).image_shape == [SIDE, SIDE, 3]


def test_verification_image_size_must_match_property(dataset, tmp_path, capsys):
    from eval import verification
    mx.model.save_checkpoint(str(tmp_path / "m"), 1, tiny_symbol(), {}, {})
    assert verification.main(["--data-dir", dataset, "--model", str(tmp_path / "m") + ",1", "--cpu",
                              "--image-size", "112,112", "--target", "lfw"]) == 1
    assert "property says the images are 8x8" in _one_line(capsys.readouterr().err)


def test_pretrained_of_another_width_names_the_parameter_and_both_shapes(tmp_path, dataset):
    ckpts.save_checkpoint(str(tmp_path / "emb12"), 1, tiny_symbol(12),
                          {"fc1_weight": mx.nd.zeros((12, 3 * SIDE * SIDE)), "fc1_bias": mx.nd.zeros((12,))}, {})
    cfg = config(tmp_path / "run", dataset, pretrained=str(tmp_path / "emb12") + ",1")
    with pytest.raises(ValueError, match=r"argument fc1_weight has shape \(12, 192\) in the checkpoint but "
                                         r"\(6, 192\) in this network"):
        fit(cfg, symbol=tiny_symbol())


def test_pretrained_r18_into_r34_warns_with_the_count(caplog):
    import symbols
    shapes = {"data": (2, 3, 112, 112), "softmax_label": (2,)}
    r18 = symbols.get_symbol({"network": "r18", "num_classes": 10, "emb_size": 64})
    r34 = symbols.get_symbol({"network": "r34", "num_classes": 10, "emb_size": 64})
    args, _, auxs = r18.infer_shape(**shapes)
    arg = {n: mx.nd.zeros(s) for n, s in zip(r18.list_arguments(), args) if n not in shapes}
    aux = {n: mx.nd.zeros(s) for n, s in zip(r18.list_auxiliary_states(), auxs)}
    with caplog.at_level(logging.INFO):
        missing = ckpts.check_pretrained("r18,1", r34, arg, aux, shapes)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and re.search(r"r18,1: \d+ of \d+ network parameter\(s\) are not in the checkpoint",
                                            warnings[0].getMessage())
    assert f"{len([m for m in missing if not m.startswith('fc7')])} of" in warnings[0].getMessage()
    caplog.clear()
    without_fc7 = {k: v for k, v in arg.items() if not k.startswith("fc7")}
    with caplog.at_level(logging.INFO):
        ckpts.check_pretrained("r18,1", r18, without_fc7, aux, shapes)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # fine-tuning from an embedding: info


def _patch_label(rec_dir, record, value, vector_index=None):
    """Overwrite the float label of ``record`` (header label, or label[vector_index] of a vector label)."""
    _, offsets = read_index(os.path.join(rec_dir, "train.idx"))
    pos = offsets[record] + 8 + (4 if vector_index is None else 24 + 4 * vector_index)
    with open(os.path.join(rec_dir, "train.rec"), "r+b") as f:
        f.seek(pos)
        f.write(struct.pack("<f", value))


def test_nan_label_is_named_in_training_and_in_inspect(tmp_path, dataset):
    from iterators.tools.inspect_dataset import inspect_dataset
    bad = _broken_dataset(tmp_path, dataset, "labels")
    _patch_label(bad, 3, float("nan"))
    it = FaceImageIter(8, (3, SIDE, SIDE), os.path.join(bad, "train.rec"), num_workers=0)
    with pytest.raises(RecordLabelError, match=r"train.rec record 3: label nan is not a finite number"):
        for _ in it:
            pass
    info = inspect_dataset(bad)
    assert any("record 3: label nan is not a finite number" in e for e in info["errors"]), info["errors"]


def test_nan_header_is_named_in_training_and_in_inspect(tmp_path, dataset):
    from iterators.tools.inspect_dataset import inspect_dataset
    bad = _broken_dataset(tmp_path, dataset, "header")
    _patch_label(bad, 0, float("nan"), vector_index=1)
    with pytest.raises(RecordFormatError, match=r"train.rec header record 0: label nan is not a finite number"):
        FaceImageIter(8, (3, SIDE, SIDE), os.path.join(bad, "train.rec"), num_workers=0)
    info = inspect_dataset(bad)
    assert any("header record 0: label nan" in e for e in info["errors"]), info


def test_property_with_non_utf8_bytes_names_the_file(tmp_path):
    (tmp_path / "property").write_bytes(b"8,\xff8,8\n")
    with pytest.raises(RecordFormatError, match=r"property: byte 2 \(b'\\xff'\) is not UTF-8 text"):
        read_property(tmp_path)


def test_inspect_reports_a_truncated_rec_and_an_idx_past_the_end(tmp_path, dataset):
    from iterators.tools.inspect_dataset import inspect_dataset
    truncated = _broken_dataset(tmp_path, dataset, "truncated")
    rec = os.path.join(truncated, "train.rec")
    _, offsets = read_index(os.path.join(truncated, "train.idx"))
    with open(rec, "r+b") as f:
        f.truncate(offsets[20] + 10)  # images 20.. and the identity records are cut
    info = inspect_dataset(truncated)
    assert info["errors"] and "train.rec" in info["errors"][0], info
    from iterators.tools import inspect_dataset as tool
    assert tool.main([truncated]) == 1  # a report with the errors, not a crash
    past = _broken_dataset(tmp_path, dataset, "past")
    idx = os.path.join(past, "train.idx")
    lines = open(idx).read().splitlines()
    lines[5] = "5\t99999999"
    open(idx, "w").write("\n".join(lines) + "\n")
    info = inspect_dataset(past, decode=True)
    assert any("record 5" in e or "byte 99999999" in e for e in info["errors"]), info["errors"]
    assert info["num_images"] == IDENTITIES * PER_ID


def test_build_rec_zero_resize_and_outputs_of_the_wrong_kind(tmp_path, capsys):
    from eval import build_bin
    from iterators.tools import build_rec
    with pytest.raises(SystemExit) as exit_:
        build_rec.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--resize", "0,0"])
    assert exit_.value.code == 2 and "image size '0,0'" in capsys.readouterr().err
    faces = tmp_path / "faces"
    for person in ("a", "b"):
        (faces / person).mkdir(parents=True)
        for k in range(2):
            import cv2
            cv2.imwrite(str(faces / person / f"{k}.png"), np.full((SIDE, SIDE, 3), 40 * k, np.uint8))
    (tmp_path / "afile").write_text("x")
    assert build_rec.main(["--input", str(faces), "--output", str(tmp_path / "afile"),
                           "--image-size", f"{SIDE},{SIDE}"]) == 1
    assert "exists and is not a directory" in _one_line(capsys.readouterr().err)
    assert build_bin.main(["--image-folder", str(faces), "--output", str(tmp_path), "--num-pairs", "20",
                           "--nfolds", "1"]) == 1
    assert "is a directory" in _one_line(capsys.readouterr().err)
    assert build_rec.main(["--input", str(faces), "--output", str(tmp_path / "data"),
                           "--image-size", f"{SIDE},{SIDE}"]) == 0
    capsys.readouterr()
    rec = tmp_path / "data" / "train.rec"
    before = rec.read_bytes()
    assert build_bin.main(["--image-folder", str(faces), "--output", str(rec), "--num-pairs", "4",
                           "--nfolds", "1"]) == 1
    assert "is not a verification pack" in _one_line(capsys.readouterr().err) and rec.read_bytes() == before


def test_all_negative_pack_warns_that_accuracy_is_meaningless(tmp_path, caplog):
    from eval.verification import load_bin
    import cv2
    img = cv2.imencode(".png", np.zeros((SIDE, SIDE, 3), np.uint8))[1].tobytes()
    write_bin(tmp_path / "neg.bin", [img] * 8, [False] * 4)
    with caplog.at_level(logging.WARNING):
        load_bin(str(tmp_path / "neg.bin"), (SIDE, SIDE))
    assert "all 4 pairs are impostor" in caplog.text and "meaningless" in caplog.text


# ============================================================================ fault injection (slow)

TRAIN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import mxnet as mx
    sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
    from iterators.formats.cli import run_cli
    from recognition.config import load_config, load_run_config
    from recognition.engine import fit
    run, data, max_steps, mode, nth = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])

    def symbol():
        data_ = mx.sym.var("data")
        fc0 = mx.sym.FullyConnected(mx.sym.flatten(data_ * 0.0078125), num_hidden=512, name="fc0")
        fc1 = mx.sym.FullyConnected(fc0, num_hidden=6, name="fc1")
        fc7 = mx.sym.FullyConnected(fc1, num_hidden=8, name="fc7")
        return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7, mx.sym.var("softmax_label"),
                                                                         normalization="valid", name="softmax")])

    calls = {"n": 0}
    def kill_on_nth(original, after):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            out = original(*args, **kwargs)
            if calls["n"] == nth and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapper
    if mode == "nd_save":      # inside a checkpoint write: the temporary is complete, not yet renamed
        mx.nd.save = kill_on_nth(mx.nd.save, after=True)
    elif mode == "replace":    # just after a rename (before the directory fsync / pruning)
        os.replace = kill_on_nth(os.replace, after=True)
    elif mode == "rmtree":     # while pruning an old resume state
        import shutil
        shutil.rmtree = kill_on_nth(shutil.rmtree, after=False)

    def main(argv):
        if os.path.isfile(os.path.join(run, "config.json")):
            cfg = load_run_config(run, {"max_steps": max_steps})
        else:
            cfg = load_config(overrides=dict(network="r18", image_shape=[8, 8, 3], dataset_path=data,
                                             prefix=os.path.join(run, "model"), per_batch_size=8, lr=0.001,
                                             frequent=2, verbose=1, ckpt=2, ckpt_embedding=False, seed=0,
                                             data_workers=1, val_targets=[], max_steps=max_steps))
        result = fit(cfg, symbol=symbol())
        print("finished", result.global_step, flush=True)
        return 0
    sys.exit(run_cli(main, [], "train"))
""")


def _run_train(script, run, data, max_steps, mode="none", nth=0, preexec_fn=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO, REPO=REPO, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(run), str(data), str(max_steps), mode, str(nth)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=preexec_fn)


def _resume_lines(run):
    """Global steps of the "resuming ... from global step N" lines of the run's training.log."""
    log = os.path.join(run, "training.log")
    return re.findall(r"resuming \S+ from global step (\d+)", open(log).read()) if os.path.isfile(log) else []


def _check_run_dir(run):
    """Every resume state and model file loads; returns the newest state's global step."""
    for path in ckpts.list_resume_states(run):
        state, _, _ = ckpts._read_resume_dir(path)
        assert os.path.basename(path) == "step-%010d" % state["global_step"]
    for name in os.listdir(run):
        if name.startswith(".tmp-"):  # the killed writer's own temporary (checked by the caller), never read
            continue
        if name.endswith(".params"):
            mx.nd.load(os.path.join(run, name))
        if name.endswith(".json"):
            json.load(open(os.path.join(run, name)))
    states = ckpts.list_resume_states(run)
    return int(os.path.basename(states[-1])[5:]) if states else None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_always_resumes_from_the_newest_state(tmp_path, dataset):
    """10 seeded kills (random time, inside an ``mx.nd.save`` of a checkpoint, just after a rename, while pruning),
    each followed by a resume: it continues from the newest state, every file loads, no temporary survives."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run = tmp_path / "run"
    rng = random.Random(13)
    modes = ["time", "nd_save", "replace", "rmtree", "time", "nd_save", "replace", "time", "nd_save", "replace"]
    max_steps, resumed_from = 400, []
    for attempt, mode in enumerate(modes):
        newest_before = _check_run_dir(run) if run.exists() else None
        resumes_before = _resume_lines(run)
        nth = rng.randint(3, 12)
        proc = _run_train(script, run, dataset, max_steps, mode, nth)
        if mode == "time":  # a random moment once training runs (resumed, or with a first state to resume from)
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None and (
                    len(_resume_lines(run)) == len(resumes_before) if newest_before is not None
                    else not ckpts.list_resume_states(run)):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (attempt, mode, err[-2000:])
        _check_run_dir(run)
        match = _resume_lines(run)
        if newest_before is not None and len(match) > len(resumes_before):  # (killed before resuming: no line)
            assert int(match[-1]) == newest_before, (attempt, mode, match[-1:], newest_before)
            resumed_from.append(newest_before)
        for leftover in tmp_leftovers(run):  # only the just-killed process may have left temporaries
            assert f".tmp-{proc.pid}-" in os.path.basename(leftover), (attempt, leftover)
    assert len(set(resumed_from)) > 3  # training made progress between kills
    proc = _run_train(script, run, dataset, _check_run_dir(run) + 2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "finished" in out, err[-2000:]
    assert tmp_leftovers(run) == []
    _check_run_dir(run)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_file_size_limit_during_training_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, dataset):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run = tmp_path / "run"
    proc = _run_train(script, run, dataset, 3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    good = run / "model-0003.params"
    before = good.read_bytes()
    limit = len(before) - 1000

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    proc = _run_train(script, run, dataset, 6, preexec_fn=limit_file_size)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "cannot write" in lines[0] and "file size limit" in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert good.read_bytes() == before
    mx.model.load_checkpoint(str(run / "model"), 3)
    assert _check_run_dir(run) == 3
    assert tmp_leftovers(run) == []
