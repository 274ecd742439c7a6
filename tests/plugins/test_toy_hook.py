"""A toy hook added by this file alone: an exponential moving average of the trained weights (toy_ema.decay),
written beside each checkpoint. Its section, its rule, its flag (whole matrices on each rank), its memory term
(the average's copy) and, trained, the average equals one computed independently from the same weights."""

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtune import config as C
from slimtune.errors import ConfigError
from slimtune.hooks import Hooks
from slimtune.plan import plan_memory
from slimtune.registry import HOOKS, SECTIONS
from slimtune.schema import option
from slimtune.trainer import run
from slimtune_testutil import TINY


@dataclass(frozen=True)
class ToyEMAConfig:
    decay: float = option("weight of the running average at each step", 0.9)


ToyEMAConfig.fixed_on_resume = False


class EMA(Hooks):
    section = "toy_ema"
    last = None  # the latest instance, for the test

    @classmethod
    def requires(cls, cfg):
        return {"whole_matrices"}

    @classmethod
    def validate(cls, cfg):
        if not 0 < cfg.toy_ema.decay < 1:
            raise ConfigError(f"toy_ema.decay={cfg.toy_ema.decay} must be in (0, 1)")

    @classmethod
    def state_bytes(cls, options, trainable_bytes):
        return trainable_bytes  # one fp32 copy of what trains

    def __init__(self, options: ToyEMAConfig):
        self.decay, self.average = options.decay, {}
        EMA.last = self

    def on_setup(self, model, optimizer, cfg):
        self.average = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def after_step(self, model, optimizer, step):
        for n, p in model.named_parameters():
            if n in self.average:
                self.average[n].lerp_(p.detach().float(), 1 - self.decay)

    def on_save(self, path, step):
        save_file({n: t.contiguous() for n, t in self.average.items()}, str(path / "ema.safetensors"))


class Trajectory(Hooks):
    """The trained weights after setup and after every step (the independent record)."""

    def __init__(self):
        self.weights = []

    def on_setup(self, model, optimizer, cfg):
        self.after_step(model, optimizer, 0)

    def after_step(self, model, optimizer, step):
        self.weights.append({n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad})


@pytest.fixture(autouse=True)
def toy(plug):
    plug(SECTIONS, "toy_ema", ToyEMAConfig)
    plug(HOOKS, "toy_ema", EMA)


def test_selectable_and_validated():
    assert C.load_config("lora", [*TINY, "hooks=[toy_ema]", "toy_ema.decay=0.5"]).toy_ema.decay == 0.5
    with pytest.raises(ConfigError, match=r"toy_ema.decay=1.0 must be in \(0, 1\)"):
        C.load_config("lora", [*TINY, "hooks=[toy_ema]", "toy_ema.decay=1"])
    with pytest.raises(
        ConfigError,
        match="hooks=toy_ema needs each rank to hold whole parameter matrices, which "
        "engine.name=fsdp2 does not give: change one of hooks and engine.name",
    ):
        C.load_config("lora", [*TINY, "hooks=[toy_ema]", "engine.name=fsdp2"])


def test_planned_copy_is_its_declared_term():
    without = plan_memory(C.load_config("lora", TINY), device="cpu")
    with_ema = plan_memory(C.load_config("lora", [*TINY, "hooks=[toy_ema]"]), device="cpu")
    assert with_ema.phases["eval"] - without.phases["eval"] == 4 * with_ema.details["trainable_params"]


def test_trained_average_equals_the_formula(tmp_path):
    trajectory = Trajectory()
    run(
        C.load_config(
            "lora",
            [
                *TINY,
                "hooks=[toy_ema]",
                "toy_ema.decay=0.8",
                "train.max_steps=4",
                "checkpoint.every=2",
                f"output_dir={tmp_path}",
            ],
        ),
        hooks=[trajectory],
    )
    want = {n: t.clone() for n, t in trajectory.weights[0].items()}
    for weights in trajectory.weights[1:]:
        for n in want:
            want[n] = 0.8 * want[n] + 0.2 * weights[n]
    for n, t in EMA.last.average.items():
        torch.testing.assert_close(t, want[n])
    saved = load_file(str(tmp_path / "checkpoints" / "step_2" / "ema.safetensors"))
    assert set(saved) == set(want) and not torch.equal(saved[n], EMA.last.average[n])  # step 2's, not step 4's
