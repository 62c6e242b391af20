"""The README's "Extending" examples run as written (a doc example that rots is worse than none)."""
import pathlib
import re

import symbols
from symbols.registry import NETWORKS

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _extending_blocks():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Extending"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_backbone_example_registers_and_builds_through_the_config():
    block = next(b for b in _extending_blocks() if "register_network" in b)
    try:
        exec(compile(block, "README.md", "exec"), {})
        sym = symbols.get_symbol({"network": "tiny", "num_classes": 10, "loss": "arcface"})
        _, out_shapes, _ = sym.infer_shape(data=(2, 3, 112, 112), softmax_label=(2,))
        assert out_shapes[0] == (2, 128)  # the preset's emb_size
        from recognition.config import load_config
        assert load_config(overrides={"network": "tiny"}).net_output == "GDC"
    finally:
        if "tiny" in NETWORKS:
            NETWORKS.unregister("tiny")


class _FakeTrainer:
    def __init__(self):
        self.stops = []

    def request_stop(self, reason, message=None):
        self.stops.append((reason, message))


def test_hook_example_stops_and_keeps_its_state():
    block = next(b for b in _extending_blocks() if "class StopWhenLfwReaches" in b)
    namespace = {}
    exec(compile(block.replace("result = fit(config, hooks=[StopWhenLfwReaches(0.995)])", ""), "README.md", "exec"),
         namespace)
    hook = namespace["StopWhenLfwReaches"](0.99)
    trainer = _FakeTrainer()
    hook.after_verification(trainer, {"lfw": {"acc": 0.98}})
    assert trainer.stops == []
    hook.after_verification(trainer, {"lfw": {"acc": 0.995}})
    assert trainer.stops and trainer.stops[0][0] == "lfw_target"
    restored = namespace["StopWhenLfwReaches"](0.99)
    restored.load_state_dict(hook.state_dict())
    assert restored.best == 0.995
