"""bf16 master weights (optim/master.py): stochastic rounding is unbiased and slice-independent, Kahan summation
follows its recurrence written out here, both keep small updates that round-to-nearest loses, and a run with
optim.master_dtype=bfloat16 trains in bf16 and is refused where it cannot run."""

import pytest
import torch

from slimtune.config import load_config
from slimtune.errors import ConfigError
from slimtune.optim import master
from slimtune.optim.adamw import AdamW


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values on either side of fp32 x: truncated toward zero, and one bf16 ulp further out."""
    bits = x.view(torch.int32)
    low = (bits & -65536).view(torch.float32)
    high = ((bits & -65536) + 65536).view(torch.float32)
    return low, high


def test_stochastic_rounding_picks_a_neighbour_with_the_right_probability():
    n = 200_000
    for value in (1.00390625 + 2**-12, -3.14159, 1e-30, 0.1):
        x = torch.full((n,), value, dtype=torch.float32)
        out = master.stochastic_round(x, key=7, step=1).float()
        low, high = _neighbours(x[:1])
        assert set(out.unique().tolist()) <= {low.item(), high.item()}
        p_up = (x[:1].view(torch.int32) & 65535).item() / 65536  # dropped bits / 2^16
        frac = (out == high.item()).double().mean().item()
        assert abs(frac - p_up) < 4 * (p_up * (1 - p_up) / n) ** 0.5 + 1e-9, (value, frac, p_up)
        # unbiased: the mean of the rounded values is the fp32 value
        assert abs(out.double().mean().item() - value) <= 4 * (high - low).abs().item() / n**0.5 + 1e-45


def test_stochastic_rounding_keeps_exact_and_non_finite_values():
    x = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf"), 3.3895313892515355e38])
    out = master.stochastic_round(x, key=1, step=3)
    assert torch.equal(out[:5].float(), x[:5])
    assert torch.isfinite(out[5])  # the largest bf16 does not carry into inf
    assert torch.isnan(master.stochastic_round(torch.tensor([float("nan")]), 1, 1)).all()


def test_random_stream_of_a_slice_is_the_slice_of_the_stream(monkeypatch):
    monkeypatch.setattr(master, "ROUND_BLOCK", 1000)
    whole = master.random_bits(3500, key=5, step=2, start=0)
    for start, stop in ((0, 1000), (300, 1700), (999, 1001), (2500, 3500)):
        assert torch.equal(master.random_bits(stop - start, 5, 2, start), whole[start:stop])
    assert not torch.equal(master.random_bits(3500, 5, 3, 0), whole)  # another step, other bits
    assert not torch.equal(master.random_bits(3500, 6, 2, 0), whole)  # another parameter, other bits
    assert 0 <= int(whole.min()) and int(whole.max()) < 2**16


def test_kahan_write_back_follows_the_recurrence():
    torch.manual_seed(0)
    p = torch.randn(1000).to(torch.bfloat16)
    c = (torch.randn(1000) * 1e-3).to(torch.bfloat16)
    w = p.float() + torch.randn(1000) * 1e-4
    # y = (w_new - w) + c;  w' = bf16(w + y);  c' = bf16(y - (w' - w)), each step in fp32
    y = (w - p.float()) + c.float()
    p_ref = (p.float() + y).to(torch.bfloat16)
    c_ref = (y - (p_ref.float() - p.float())).to(torch.bfloat16)
    state = {master.KAHAN_KEY: c.clone(), "step": torch.tensor(1.0)}
    master.write_back(p, w.clone(), state, "kahan", key=0)
    assert torch.equal(p, p_ref) and torch.equal(state[master.KAHAN_KEY], c_ref)


@pytest.mark.parametrize("compensation", ["kahan", "stochastic"])
def test_small_updates_accumulate_where_round_to_nearest_loses_them(compensation):
    """1.0 + 2000 x 5e-5 = 1.1 (each step far below half a bf16 ulp of 1: 2^-8)."""
    state = {"step": torch.tensor(0.0)}
    p = torch.ones(4096, dtype=torch.bfloat16)
    master.init_master_state(state, p, compensation)
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(2000):
        state["step"] += 1
        master.write_back(p, p.float() + 5e-5, state, compensation, key=3)
        nearest.copy_(nearest.float() + 5e-5)
    assert torch.equal(nearest, torch.ones_like(nearest))  # round to nearest never moves
    err = (p.float() - 1.1).abs()
    if compensation == "kahan":  # within one bf16 ulp of 1.1 everywhere
        assert float(err.max()) <= 2**-7
    else:  # unbiased: the mean over the elements is 1.1 to a fraction of an ulp
        assert abs(float(p.float().mean()) - 1.1) < 2**-10


def _fit(compensation: str | None, steps: int = 300) -> float:
    """Loss of a least-squares fit trained with AdamW at a small lr, bf16 masters (fp32 when None)."""
    g = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(256, 64, generator=g), torch.randn(64, 8, generator=g)
    y = x @ w_true
    w = torch.nn.Parameter(torch.zeros(64, 8, dtype=torch.float32 if compensation is None else torch.bfloat16))
    opt = AdamW([w], lr=2e-3, compensation=compensation or "none")
    for _ in range(steps):
        opt.zero_grad()
        loss = ((x @ w.float() - y) ** 2).mean()
        loss.backward()
        opt.step()
    return float(((x @ w.detach().float() - y) ** 2).mean())


def test_bf16_masters_with_compensation_train_as_fp32_masters_do():
    fp32, none, kahan, stochastic = (_fit(c) for c in (None, "none", "kahan", "stochastic"))
    assert kahan < none and stochastic < none
    assert abs(kahan - fp32) < 0.1 * fp32 + 1e-3, (fp32, kahan)
    assert abs(stochastic - fp32) < 0.25 * fp32 + 1e-3, (fp32, stochastic)


def test_master_dtype_refusals():
    base = ["model.name=tiny-llama", "optim.master_dtype=bfloat16"]
    cases = {
        ("lora", ()): "adapter.type=lora",
        ("full", ("optim.name=galore",)): "optim.name=galore",
        ("full", ("engine.name=fsdp2",)): "engine.name=fsdp2",
        ("full", ("train.precision=fp8",)): "train.precision=fp8",
    }
    for (recipe, extra), needle in cases.items():
        with pytest.raises(ConfigError, match=needle) as e:
            load_config(recipe, [*base, *extra])
        assert "optim.master_dtype" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="optim.compensation=kahan.*optim.master_dtype=bfloat16"):
        load_config("full", ["optim.compensation=kahan"])
    assert master.compensation_of(load_config("full", base).optim) == "stochastic"
    assert master.compensation_of(load_config("full", []).optim) == "none"
