"""Hooks named in a recipe (`hooks: [...]`) are built from the HOOKS registry, called in order around every
step, and get on_load on resume: a technique outside the loop needs no change to loop.py."""

import pytest

from slimtune.config import load_config
from slimtune.registry import HOOKS
from slimtune.trainer import run
from slimtune.trainer.hooks import Hooks

CALLS: list = []


class Recorder(Hooks):
    def on_setup(self, model, optimizer, cfg):
        CALLS.append(("setup", cfg.train.max_steps))

    def on_load(self, path, step):
        CALLS.append(("load", path.name, step))

    def after_backward(self, model, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        CALLS.append(("backward", step, all(g is not None for g in grads)))

    def after_step(self, model, optimizer, step):
        CALLS.append(("step", step))

    def on_save(self, path, step):
        CALLS.append(("save", path.name, step))


@pytest.fixture(autouse=True)
def recorder():
    HOOKS.register("test_recorder")(Recorder)
    CALLS.clear()
    yield
    del HOOKS["test_recorder"]


def test_recipe_hooks_run_and_get_on_load_on_resume(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "checkpoint.every=2", "hooks=[test_recorder]", f"output_dir={tmp_path}"]
    run(load_config("lora", [*args, "train.max_steps=3"]))
    assert CALLS[0] == ("setup", 3)
    assert [c for c in CALLS if c[0] == "step"] == [("step", 1), ("step", 2), ("step", 3)]
    assert [c for c in CALLS if c[0] == "backward"] == [("backward", s, True) for s in range(3)]
    assert ("save", "step_2", 2) in CALLS and not any(c[0] == "load" for c in CALLS)

    CALLS.clear()
    run(load_config("lora", [*args, "train.max_steps=4", "resume=true"]))
    assert CALLS[:2] == [("setup", 4), ("load", "step_2", 2)]  # on_load after setup, before any step
    assert [c for c in CALLS if c[0] == "step"] == [("step", 3), ("step", 4)]


def test_an_unregistered_hook_is_a_config_error():
    from slimtune.errors import ConfigError

    with pytest.raises(ConfigError, match="hooks='nope' is not one of: test_recorder"):
        load_config("lora", ["hooks=[nope]"])
