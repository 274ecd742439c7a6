"""A toy pruning method added by this file alone: in each row, a seeded uniformly random choice of entries
goes (toy_random.seed). Its section and rule, `slimtune prune` writes the pruned dir, the planner plans
recovery on it, and recovery trains with the random mask held."""

from dataclasses import dataclass

import pytest
import torch

from slimtune import config as C
from slimtune.errors import ConfigError
from slimtune.formats.hf import load_model
from slimtune.model.commands import prune_command
from slimtune.plan import plan_memory
from slimtune.registry import PRUNE_METHODS, SECTIONS
from slimtune.schema import option
from slimtune.technique import Technique
from slimtune.trainer import run
from slimtune_testutil import TINY, losses


@dataclass(frozen=True)
class ToyRandomConfig:
    seed: int = option("seed of the random choice", 0)


ToyRandomConfig.fixed_on_resume = False


class RandomPrune(Technique):
    section = "toy_random"
    statistic = None  # no calibration data

    @classmethod
    def validate(cls, cfg):
        if cfg.toy_random.seed < 0:
            raise ConfigError(f"toy_random.seed={cfg.toy_random.seed} must be >= 0")

    @staticmethod
    def prune(W, stat, sparsity, nm, scope, options):
        g = torch.Generator().manual_seed(options.seed + W.shape[0] * 7919 + W.shape[1])
        drop = round(W.shape[1] * sparsity)
        order = torch.rand(W.shape, generator=g).argsort(dim=1)[:, :drop]
        W.scatter_(1, order.to(W.device), 0.0)


@pytest.fixture(autouse=True)
def toy(plug):
    plug(SECTIONS, "toy_random", ToyRandomConfig)
    plug(PRUNE_METHODS, "toy_random", RandomPrune)


def prune(out, *overrides):
    return prune_command(
        C.load_config(
            None,
            ["model.name=tiny-llama", "prune.method=toy_random", "prune.sparsity=0.5", f"output_dir={out}", *overrides],
        )
    )


def test_selectable_and_validated(tmp_path):
    assert C.load_config(None, ["prune.method=toy_random", "toy_random.seed=3"]).toy_random.seed == 3
    with pytest.raises(ConfigError, match="toy_random.seed=-1 must be >= 0"):
        prune(tmp_path / "bad", "toy_random.seed=-1")
    assert not (tmp_path / "bad").exists()


def test_pruned_rows_planned_and_recovered(tmp_path):
    out = prune(tmp_path / "p", "toy_random.seed=1")
    model = load_model(str(out), "float32")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal((weight == 0).sum(dim=1), torch.full((weight.shape[0],), round(weight.shape[1] * 0.5)))
    other = load_model(str(prune(tmp_path / "q", "toy_random.seed=2")), "float32").model.layers[0].mlp.up_proj
    assert not torch.equal(weight == 0, other.weight == 0)  # the seed chooses

    cfg = C.load_config(
        "recover", [*TINY, f"model.name={out}", "train.max_steps=6", "train.lr=1e-3", f"output_dir={tmp_path / 'r'}"]
    )
    assert plan_memory(cfg, device="cpu").peak_memory_bytes > 0
    run(cfg)
    curve = losses(tmp_path / "r")
    assert curve[-1] < curve[0]
    trained = load_model(str(tmp_path / "r" / "final"), "float32").model.layers[0].mlp.up_proj.weight
    assert torch.equal(trained == 0, weight == 0) and not torch.equal(trained, weight)  # trained, mask held
