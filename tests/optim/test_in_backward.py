"""Optimizer-in-backward: same parameters as backward / step / zero_grad, no gradients left, lr and resume."""

import copy

import pytest
import torch
from torch import nn

from slimtune.optim.adamw import AdamW
from slimtune.optim.in_backward import OptimizerInBackward
from slimtune.io import flatten_state, unflatten_state

MAKERS = {
    "slimtune_adamw": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.01),
    "slimtune_adamw8": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.01, state_bits=8),
    "torch_adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False),
}


def _mlp(seed=0):
    torch.manual_seed(seed)
    # the 96 x 64 middle layer has 6144 values: its moments are 8-bit under state_bits=8 (>= 4096)
    return nn.Sequential(nn.Linear(12, 64), nn.GELU(), nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 3))


def _batch(step, micro=0):
    g = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)


def _train(model, opt, steps, start=0, accum=1, lrs=None):
    """The trainer's loop shape: lr into param_groups, micro-step backwards, step, zero_grad."""
    for t in range(start, start + steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for m in range(accum):
            x, y = _batch(t, m)
            (nn.functional.mse_loss(model(x), y) / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _assert_same(a, b, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


@pytest.mark.parametrize("maker", list(MAKERS))
def test_matches_ordinary_loop(maker):
    make = MAKERS[maker]
    ref, model = _mlp(), _mlp()
    _train(ref, make(list(ref.parameters())), 15)
    _train(model, OptimizerInBackward(model.parameters(), make), 15)
    _assert_same(ref, model)
    assert not torch.equal(next(model.parameters()), next(_mlp().parameters()))


def test_no_gradient_survives_backward():
    model = _mlp()
    opt = OptimizerInBackward(model.parameters(), MAKERS["slimtune_adamw"])
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # stepped in backward
    assert torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0) == 0  # why clipping cannot work
    opt.remove_hooks()
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lr_through_param_groups_reaches_inner_optimizers():
    lrs = [1e-2 * (0.7**t) for t in range(8)]
    ref, model = _mlp(), _mlp()
    _train(ref, MAKERS["torch_adamw"](list(ref.parameters())), 8, lrs=lrs)
    opt = OptimizerInBackward(model.parameters(), MAKERS["torch_adamw"])
    assert len(opt.param_groups) == len(list(model.parameters()))
    _train(model, opt, 8, lrs=lrs)
    _assert_same(ref, model)
    frozen = _mlp()
    opt = OptimizerInBackward(frozen.parameters(), MAKERS["slimtune_adamw"])
    _train(frozen, opt, 2, lrs=[0.0, 0.0])
    _assert_same(frozen, _mlp(), atol=0)  # lr 0: nothing moves


def test_gradient_accumulation_steps_on_last_micro_step():
    ref, model = _mlp(), _mlp()
    _train(ref, MAKERS["slimtune_adamw"](list(ref.parameters())), 6, accum=3)
    _train(model, OptimizerInBackward(model.parameters(), MAKERS["slimtune_adamw"], accumulation_steps=3), 6, accum=3)
    _assert_same(ref, model)


@pytest.mark.parametrize("maker", ["slimtune_adamw", "slimtune_adamw8", "torch_adamw"])
def test_state_dict_round_trip_resumes_identically(maker):
    make = MAKERS[maker]
    straight = _mlp()
    _train(straight, OptimizerInBackward(straight.parameters(), make), 12)

    first = _mlp()
    opt1 = OptimizerInBackward(first.parameters(), make)
    _train(first, opt1, 6)
    tensors, skeleton = flatten_state(opt1.state_dict())  # the checkpoint path: tensors and scalars only
    sd = unflatten_state(copy.deepcopy(skeleton), {k: v.clone() for k, v in tensors.items()})
    opt1.remove_hooks()
    resumed = copy.deepcopy(first)
    opt2 = OptimizerInBackward(resumed.parameters(), make)
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(list(resumed.parameters()))
    _train(resumed, opt2, 6, start=6)
    _assert_same(straight, resumed, atol=0)
    eight_bit = sum("exp_avg_q_int8" in st for st in opt2.state.values())
    assert eight_bit == (1 if maker == "slimtune_adamw8" else 0)  # the 96 x 64 weight
    with pytest.raises(ValueError, match="per-parameter"):
        opt2.load_state_dict({0: sd[0]})
