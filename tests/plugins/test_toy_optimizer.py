"""A toy optimizer, signSGD with momentum (Bernstein et al. 2018), added by this file alone: its section
(toy_signsgd.momentum), its rule, its memory terms, and it trains."""

import math
from dataclasses import dataclass

import pytest
import torch

import slimtune
from slimtune import config as C
from slimtune.errors import ConfigError
from slimtune.plan import plan_memory
from slimtune.registry import OPTIMIZERS, SECTIONS
from slimtune.schema import option
from slimtune.technique import declares
from slimtune.trainer import run
from slimtune_testutil import TINY, losses


@dataclass(frozen=True)
class ToySignSGDConfig:
    momentum: float = option("momentum of the sign's argument", 0.0)


ToySignSGDConfig.fixed_on_resume = False


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["momentum"]:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    g = buf.mul_(group["momentum"]).add_(g)
                p.add_(torch.sign(g), alpha=-group["lr"])


def _validate(cfg):
    if not 0 <= cfg.toy_signsgd.momentum < 1:
        raise ConfigError(f"toy_signsgd.momentum={cfg.toy_signsgd.momentum} must be in [0, 1)")


def _state_bytes(optim, options, name, shape):
    return 4 * math.prod(shape) if options.momentum else 0


@declares(
    validate=_validate,
    section="toy_signsgd",
    state_bytes=_state_bytes,
    step_bytes=lambda optim, options, name, shape: 0,
)
def build_signsgd(optim, options, named, lr):
    return SignSGD([p for _, p in named], lr, options.momentum)


@pytest.fixture(autouse=True)
def toy(plug):
    plug(SECTIONS, "toy_signsgd", ToySignSGDConfig)
    plug(OPTIMIZERS, "toy_signsgd", build_signsgd)


def test_selectable_and_validated():
    cfg = C.load_config("lora", [*TINY, "optim.name=toy_signsgd", "toy_signsgd.momentum=0.5"])
    assert cfg.toy_signsgd.momentum == 0.5
    with pytest.raises(ConfigError, match=r"toy_signsgd.momentum=1.5 must be in \[0, 1\)"):
        C.load_config("lora", [*TINY, "optim.name=toy_signsgd", "toy_signsgd.momentum=1.5"])
    with pytest.raises(ConfigError, match="unknown key 'toy_signsgd.mom'"):
        C.load_config("lora", [*TINY, "optim.name=toy_signsgd", "toy_signsgd.mom=0.5"])
    with pytest.raises(ConfigError, match="optim.name='nope' is not one of: .*toy_signsgd"):
        C.load_config("lora", [*TINY, "optim.name=nope"])


def test_planned_state_is_its_declared_term():
    base = [*TINY, "optim.name=toy_signsgd"]
    without = plan_memory(C.load_config("lora", base), device="cpu")
    with_momentum = plan_memory(C.load_config("lora", [*base, "toy_signsgd.momentum=0.9"]), device="cpu")
    trainable = with_momentum.details["trainable_params"]
    assert with_momentum.phases["eval"] - without.phases["eval"] == 4 * trainable


def test_first_step_is_minus_lr_sign_of_the_gradient():
    torch.manual_seed(0)
    model, tokenizer = slimtune.load("tiny-llama", dtype="float32")
    slimtune.add_adapter(model, "lora", rank=4)
    opt = slimtune.optimizer(model, "toy_signsgd", lr=1e-3, momentum=0.9)
    ids, labels, pos = next(slimtune.batches(tokenizer, 1, seq_len=64, batch_size=2))
    slimtune.loss(model, ids, labels, pos).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in model.named_parameters():
        if n in before:
            w, g = before[n]
            torch.testing.assert_close(p.detach(), w - 1e-3 * torch.sign(g))


def test_trains(tmp_path):
    report = run(
        C.load_config(
            "lora",
            [
                *TINY,
                "optim.name=toy_signsgd",
                "toy_signsgd.momentum=0.5",
                "train.lr=1e-3",
                "train.max_steps=8",
                f"output_dir={tmp_path}",
            ],
        )
    )
    curve = losses(tmp_path)
    assert len(curve) == 8 and curve[-1] < curve[0]
    assert report["eval_perplexity"] < report["eval_perplexity_before"]
