"""slimtune's AdamW against torch.optim.AdamW, exact resume (also through the checkpoint format), 8-bit states
(only for moments of >= 4096 values of parameters that are not 1-D, as bitsandbytes / torchao)."""

import copy
import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from slimtune.optim.adamw import AdamW
from slimtune.optim.states8bit import state_nbytes
from slimtune.io import flatten_state, unflatten_state


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(17, 9), (300,), (80, 64), (5, 3, 7), ()]  # (80, 64): 5120 values, the one 8-bit state
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * (1 + i) for i, p in enumerate(params)]


def _groups(params, lr2=3e-3, wd2=0.0):
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr2, "weight_decay": wd2}]


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g.to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_fp32_states_match_torch_adamw():
    ours, ref = _params(), _params()
    kw = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.1}
    opt = AdamW(_groups(ours), **kw)
    ref_opt = torch.optim.AdamW(_groups(ref), foreach=False, **kw)
    _run(opt, ours, 20)
    _run(ref_opt, ref, 20)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)  # torch's single-tensor arithmetic, operation for operation
    assert not torch.equal(ours[0], _params()[0])  # it did move


def test_half_precision_params_update_in_fp32():
    p16 = _params(dtype=torch.bfloat16)
    p32 = [p.detach().float().requires_grad_() for p in p16]
    # the same weight_decay on both sides (torch's AdamW defaults to 0.01, slimtune's to 0)
    opt16, opt32 = (
        AdamW(p16, lr=1e-2, weight_decay=0.01),
        torch.optim.AdamW(p32, lr=1e-2, weight_decay=0.01, foreach=False),
    )
    for p, q, g in zip(p16, p32, _grads(p16, 0)):
        p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    opt16.step()
    opt32.step()
    for p, q, p0 in zip(p16, p32, _params(dtype=torch.bfloat16)):
        # one step from the same start: torch's fp32 result rounded once to bf16
        assert p.dtype == torch.bfloat16 and not torch.equal(p, p0)
        assert torch.equal(p, q.detach().to(torch.bfloat16))


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("via_checkpoint", [False, True])
def test_resume_is_bit_identical(bits, via_checkpoint):
    straight = _params()
    opt = AdamW(_groups(straight, wd2=0.05), lr=1e-2, weight_decay=0.01, state_bits=bits)
    _run(opt, straight, 20)

    first = _params()
    opt1 = AdamW(_groups(first, wd2=0.05), lr=1e-2, weight_decay=0.01, state_bits=bits)
    _run(opt1, first, 10)
    sd = copy.deepcopy(opt1.state_dict())
    if via_checkpoint:  # the trainer's path: safetensors bytes + a JSON skeleton
        tensors, skeleton = flatten_state(sd)
        sd = unflatten_state(copy.deepcopy(skeleton), st_load(st_save(tensors)))
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = AdamW(_groups(resumed), lr=0.5, weight_decay=0.0, state_bits=bits)  # groups come from sd
    opt2.load_state_dict(sd)
    if bits == 8:
        st = opt2.state[resumed[2]]  # (80, 64): 8-bit codes come back as codes, not cast to fp32
        assert st["exp_avg_q_int8"].dtype == torch.int8 and st["exp_avg_sq_q_uint8"].dtype == torch.uint8
    for p in (resumed[0], resumed[1]):  # small / 1-D: fp32 moments in either mode
        assert opt2.state[p]["exp_avg"].dtype == opt2.state[p]["exp_avg_sq"].dtype == torch.float32
    _run(opt2, resumed, 10, start=10)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def _expected_state_bytes(params, bits):
    """Bytes of the state the 8-bit rule implies, counted here from the shapes: a 4-byte fp32 `step`
    per parameter; two fp32 moments (8 bytes a value), or for >= 4096 values of a non-1-D parameter
    two 1-byte codes per value plus two fp32 absmax per block of 256."""
    total = 0
    for p in params:
        n = p.numel()
        if bits == 8 and n >= 4096 and p.dim() >= 2:
            total += 2 * n + 2 * 4 * math.ceil(n / 256) + 4
        else:
            total += 8 * n + 4
    return total


def test_8bit_state_bytes():
    p32, p8, ref = _params(), _params(), _params()
    opt32, opt8 = AdamW(p32, state_bits=32), AdamW(p8, state_bits=8)
    ref_opt = torch.optim.AdamW(ref, foreach=False)
    for opt, ps in ((opt32, p32), (opt8, p8), (ref_opt, ref)):
        _run(opt, ps, 1)
    assert state_nbytes(opt32) == state_nbytes(ref_opt) == _expected_state_bytes(p32, 32)
    assert state_nbytes(opt8) == _expected_state_bytes(p8, 8)
    big = opt8.state[p8[2]]
    assert (big["exp_avg_q_int8"].numel() + big["exp_avg_sq_q_uint8"].numel()) / (8 * 80 * 64) == 0.25


def _mixed(seed=0):
    """A 1-D bias (128,), a small matrix 32x32 (1024 values) and a large one 128x64 (8192 values)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(128,), (32, 32), (128, 64)]]


def test_8bit_states_only_for_large_matrices_small_ones_are_torch_adamw():
    ours, ref = _mixed(), _mixed()
    kw = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.1}
    opt = AdamW(ours, state_bits=8, **kw)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    _run(opt, ours, 1)
    bias, small, large = (opt.state[p] for p in ours)
    assert sorted(large) == ["exp_avg_absmax", "exp_avg_q_int8", "exp_avg_sq_absmax", "exp_avg_sq_q_uint8", "step"]
    assert large["exp_avg_q_int8"].dtype == torch.int8 and large["exp_avg_sq_q_uint8"].dtype == torch.uint8
    for st, p in ((bias, ours[0]), (small, ours[1])):
        assert sorted(st) == ["exp_avg", "exp_avg_sq", "step"]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32 and st["exp_avg"].shape == p.shape
    _run(opt, ours, 19, start=1)
    _run(ref_opt, ref, 20)
    for p, q in zip(ours[:2], ref[:2]):  # fp32 path: torch's AdamW bit for bit, moments included
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key])
    assert not torch.equal(ours[2], ref[2])  # the 8-bit one is close to, not equal to, fp32 AdamW
    torch.testing.assert_close(ours[2], ref[2], rtol=0, atol=0.05)


@pytest.mark.parametrize("via_checkpoint", [False, True])
def test_mixed_8bit_and_fp32_states_resume_bit_identically(via_checkpoint):
    straight = _mixed()
    opt = AdamW(straight, lr=1e-2, weight_decay=0.01, state_bits=8)
    _run(opt, straight, 12)
    first = _mixed()
    opt1 = AdamW(first, lr=1e-2, weight_decay=0.01, state_bits=8)
    _run(opt1, first, 6)
    sd = copy.deepcopy(opt1.state_dict())
    if via_checkpoint:
        tensors, skeleton = flatten_state(sd)
        sd = unflatten_state(copy.deepcopy(skeleton), st_load(st_save(tensors)))
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = AdamW(resumed, lr=0.5, state_bits=8)
    opt2.load_state_dict(sd)
    for p, q in zip(first, resumed):
        a, b = opt1.state[p], opt2.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    _run(opt2, resumed, 6, start=6)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def _regression(bits, steps=200, check_at=50):
    """Noisy linear regression, minibatch gradients (noise variance 0.01 is the floor). Returns the
    full-data loss after `check_at` steps (mid-convergence) and after `steps`, and the initial loss."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 2048, 64, 64  # w: 4096 values, the smallest 8-bit state
    x = torch.randn(n, d_in, generator=g) * torch.logspace(-1, 1, d_in)  # badly scaled features
    w_true = torch.randn(d_in, d_out, generator=g) / d_in**0.5
    y = x @ w_true + 0.1 * torch.randn(n, d_out, generator=g)
    w = torch.zeros(d_in, d_out, requires_grad=True)
    b = torch.zeros(d_out, requires_grad=True)
    opt = AdamW([w, b], lr=2e-2, state_bits=bits)
    losses = []
    quantized = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (128,), generator=g)
        loss = (x[idx] @ w + b - y[idx]).square().mean()
        loss.backward()
        opt.step()
        quantized.append("exp_avg_q_int8" in opt.state[w] and "exp_avg" in opt.state[b])
        opt.zero_grad()
        if step in (check_at, steps):
            with torch.no_grad():
                losses.append((x @ w + b - y).square().mean().item())
    assert all(quantized) == (bits == 8)  # w 8-bit, the bias fp32
    return losses[0], losses[1], y.square().mean().item()


def test_8bit_states_train_like_fp32_states():
    mid32, end32, initial = _regression(32)
    mid8, end8, _ = _regression(8)
    assert end32 < 0.002 * initial and mid32 < 0.01 * initial
    assert abs(mid8 - mid32) <= 0.04 * mid32, (mid8, mid32)
    assert abs(end8 - end32) <= 0.04 * end32, (end8, end32)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="state_bits"):
        AdamW(_params(), state_bits=16)
    with pytest.raises(ValueError, match="betas"):
        AdamW(_params(), betas=(0.9, 1.0))
