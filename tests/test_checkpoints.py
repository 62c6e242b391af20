"""Checkpoint files: MXNet format, embedding cut, atomic writes that survive kill -9, resume-state layout."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import mxnet as mx
import numpy as np
import pytest

from iterators.formats.atomic import atomic_write, atomic_write_text
from recognition import checkpoints as ckpts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _training_symbol():
    data = mx.sym.var("data")
    fc1 = mx.sym.FullyConnected(mx.sym.flatten(data), num_hidden=3, name="fc1")
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=4, name="fc7")
    return mx.sym.Group([mx.sym.BlockGrad(fc1), mx.sym.SoftmaxOutput(fc7, name="softmax")])


def _params(value):
    arg = {"fc1_weight": mx.nd.full((3, 8), value), "fc1_bias": mx.nd.full((3,), value),
           "fc7_weight": mx.nd.full((4, 3), value), "fc7_bias": mx.nd.full((4,), value)}
    aux = {"bn_moving_mean": mx.nd.full((2,), value)}
    return arg, aux


def test_files_are_exactly_mxnet_checkpoints(tmp_path):
    prefix = str(tmp_path / "model")
    arg, aux = _params(2.5)
    symbol = _training_symbol()
    path = ckpts.save_checkpoint(prefix, 7, symbol, arg, aux)
    assert path == prefix + "-0007.params"
    sym, arg2, aux2 = mx.model.load_checkpoint(prefix, 7)
    assert sym.tojson() == symbol.tojson()
    assert set(arg2) == set(arg) and set(aux2) == set(aux)
    assert set(mx.nd.load(path)) == {f"arg:{k}" for k in arg} | {f"aux:{k}" for k in aux}
    np.testing.assert_array_equal(arg2["fc7_weight"].asnumpy(), arg["fc7_weight"].asnumpy())
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_embedding_checkpoint_cuts_at_fc1_and_drops_fc7(tmp_path):
    arg, aux = _params(1.0)
    sym, arg_e, aux_e = ckpts.embedding_checkpoint(_training_symbol(), arg, aux)
    assert sym.list_outputs() == ["fc1_output"]
    assert set(arg_e) == {"fc1_weight", "fc1_bias"} and set(aux_e) == set(aux)


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_pretrained_and_missing_files_have_clear_errors(tmp_path):
    assert ckpts.parse_pretrained("a/b-c/model,12") == ("a/b-c/model", 12)
    assert ckpts.parse_pretrained("a/model", default_epoch=3) == ("a/model", 3)
    with pytest.raises(ValueError, match="epoch 'x' is not an integer"):
        ckpts.parse_pretrained("m,x")
    with pytest.raises(FileNotFoundError, match=r"m-0002.params"):
        ckpts.load_pretrained(str(tmp_path / "m") + ",2")
    with pytest.raises(FileNotFoundError, match="no resume state"):
        ckpts.load_resume_state(tmp_path)


def test_resume_states_keep_the_two_newest(tmp_path):
    arg, aux = _params(0.0)
    for step in (3, 6, 9):
        ckpts.save_resume_state(tmp_path, {"global_step": step}, arg, aux,
                                lambda p, s=step: ckpts.write_state_tree(p, {0: mx.nd.full((2,), s)}))
    names = [os.path.basename(p) for p in ckpts.list_resume_states(tmp_path)]
    assert names == ["step-0000000006", "step-0000000009"]
    state, arg2, _, opt = ckpts.load_resume_state(tmp_path)
    assert state["global_step"] == 9 and set(arg2) == set(arg)
    assert ckpts.read_state_tree(opt)[0].asnumpy().tolist() == [9, 9]


WRITER = textwrap.dedent("""
    import sys
    import mxnet as mx
    from recognition import checkpoints as ckpts
    prefix, run_dir = sys.argv[1], sys.argv[2]
    data = mx.sym.var("data")
    sym = mx.sym.FullyConnected(data, num_hidden=4, name="fc1")
    version = 0
    while True:
        version += 1
        arg = {"fc1_weight": mx.nd.full((1024, 1024), version), "fc1_bias": mx.nd.full((4,), version)}
        ckpts.save_checkpoint(prefix, 1, sym, arg, {})
        ckpts.save_resume_state(run_dir, {"global_step": version}, arg, {},
                                lambda p: ckpts.write_state_tree(p, {0: mx.nd.full((25000,), version)}))
        if version == 1:
            print("ready", flush=True)
""")


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_never_leaves_an_unloadable_checkpoint(tmp_path):
    """A writer saving 4 MB checkpoints in a loop is SIGKILLed at random moments; every time, the
    insightface checkpoint and the newest resume state load and are internally consistent."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    prefix, run_dir = str(tmp_path / "model"), str(tmp_path / "run")
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=REPO)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(script), prefix, run_dir], stdout=subprocess.PIPE, env=env,
                                cwd=REPO)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        sym, arg, _ = mx.model.load_checkpoint(prefix, 1)
        value = arg["fc1_weight"].asnumpy()
        assert sym.list_outputs() == ["fc1_output"]
        assert (value == value.flat[0]).all() and arg["fc1_bias"].asnumpy()[0] == value.flat[0], attempt
        state, arg_r, _, opt = ckpts.load_resume_state(run_dir)
        assert (arg_r["fc1_weight"].asnumpy() == state["global_step"]).all()
        assert (ckpts.read_state_tree(opt)[0].asnumpy() == state["global_step"]).all()
