"""A toy training precision added by this file alone: every linear (the head aside) computes on its input
and weight rounded to toy_round.mantissa_bits mantissa bits (round to nearest even), with a straight-through
gradient. Its section, its rule, its flags (it needs full-precision linears), planned, and trained."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune import config as C
from slimtune.errors import ConfigError
from slimtune.hooks import Hooks
from slimtune.plan import plan_memory
from slimtune.registry import PRECISIONS, SECTIONS
from slimtune.schema import option
from slimtune.technique import Technique
from slimtune.trainer import run
from slimtune_testutil import TINY, losses


@dataclass(frozen=True)
class ToyRoundConfig:
    mantissa_bits: int = option("mantissa bits kept (fp32 has 23, bf16 7)", 7)


ToyRoundConfig.fixed_on_resume = False


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 `x` rounded to `bits` mantissa bits, to nearest even (integer arithmetic on the bit pattern)."""
    i = x.float().contiguous().view(torch.int32)
    drop = 23 - bits
    half = (1 << (drop - 1)) - 1 + ((i >> drop) & 1)  # ties go to the even mantissa
    return ((i + half) & ~((1 << drop) - 1)).view(torch.float32)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):
        return round_mantissa(x, bits).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class RoundLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        self.weight, self.bias, self.bits = linear.weight, linear.bias, bits  # the same Parameters

    def forward(self, x):
        return F.linear(_RoundSTE.apply(x, self.bits), _RoundSTE.apply(self.weight, self.bits), self.bias)


class ToyRound(Technique):
    section = "toy_round"

    @classmethod
    def requires(cls, cfg):
        return {"full_precision_linears"}

    @classmethod
    def validate(cls, cfg):
        if not 1 <= cfg.toy_round.mantissa_bits <= 22:
            raise ConfigError(f"toy_round.mantissa_bits={cfg.toy_round.mantissa_bits} must be in [1, 22]")

    @staticmethod
    def swap(linear: nn.Linear, options: ToyRoundConfig) -> nn.Module:
        return RoundLinear(linear, options.mantissa_bits)


class CountSwapped(Hooks):
    def on_setup(self, model, optimizer, cfg):
        self.swapped = sum(isinstance(m, RoundLinear) for m in model.modules())
        self.linears = sum(isinstance(m, nn.Linear) for m in model.modules())


@pytest.fixture(autouse=True)
def toy(plug):
    plug(SECTIONS, "toy_round", ToyRoundConfig)
    plug(PRECISIONS, "toy_round", ToyRound)


def test_rounding_is_bf16s_at_7_bits():
    x = torch.randn(4096) * torch.logspace(-8, 8, 4096)
    assert torch.equal(round_mantissa(x, 7), x.to(torch.bfloat16).float())


def test_selectable_and_validated():
    assert C.load_config("full", [*TINY, "train.precision=toy_round"]).toy_round.mantissa_bits == 7
    with pytest.raises(ConfigError, match=r"toy_round.mantissa_bits=0 must be in \[1, 22\]"):
        C.load_config("full", [*TINY, "train.precision=toy_round", "toy_round.mantissa_bits=0"])
    with pytest.raises(
        ConfigError,
        match="train.precision=toy_round needs full-precision linear layers in the "
        "base, which quant.method=nf4 does not give",
    ):
        C.load_config("qlora", [*TINY, "train.precision=toy_round"])


def test_planned():
    plan = plan_memory(C.load_config("full", [*TINY, "train.precision=toy_round"]), device="cpu")
    assert plan.peak_memory_bytes > 0 and plan.details["trainable_params"] > 0


def test_trains(tmp_path):
    counter = CountSwapped()
    report = run(
        C.load_config(
            "full",
            [
                *TINY,
                "train.precision=toy_round",
                "toy_round.mantissa_bits=10",
                "train.max_steps=6",
                "train.lr=1e-3",
                f"output_dir={tmp_path}",
            ],
        ),
        hooks=[counter],
    )
    assert counter.swapped > 0 and counter.linears == 1  # every linear but the head swapped
    curve = losses(tmp_path)
    assert curve[-1] < curve[0] and report["eval_perplexity"] < report["eval_perplexity_before"]
