"""PV-Tuning (quant/pv_tuning.py): the V step is the exact minimiser of its linearized objective over the grid
with a bounded number of changed codes (brute force over every assignment), alternating V and P steps reaches
descent on a tiny 2-bit least-squares problem (with eta = 1 / L every V step lowers the loss) where
straight-through QAT does not, and a
`qat.pv_tuning` run changes at most pv_fraction of the codes per step and converts bit for bit."""

import itertools
import math

import pytest
import torch

from slimtune.quant.fake import FakeQuantLinear, QuantFormatSpec, fake_quantize
from slimtune.quant.learned_scales import initial_scales, packed_with
from slimtune.quant.pv_tuning import codes_fixed_quantize, normalized_eta, snap, v_step


def _grid(fmt, scale, zero, n):
    """Every grid value of a block of n values: (levels,) per block (one block here)."""
    from slimtune.quant.intk import int_qmax
    from slimtune.quant.nfk import nf_codebook

    if fmt.kind == "nf":
        return nf_codebook(fmt.bits) * scale
    if fmt.kind == "int":
        q = int_qmax(fmt.bits, True)
        return torch.arange(-q, q + 1, dtype=torch.float32) * scale
    return torch.arange(0, int_qmax(fmt.bits, False) + 1, dtype=torch.float32) * scale + zero


@pytest.mark.parametrize("method, k", [("nf2", 1), ("int2", 2), ("int2a", 3), ("nf3", 2)])
def test_v_step_is_the_bounded_change_minimiser_of_its_objective(method, k):
    torch.manual_seed(hash(method) % 1000)
    fmt = QuantFormatSpec(method, block_size=6, double_quant=False).fmt
    w = torch.randn(1, 6)
    scale, zero = initial_scales(w, fmt)
    w_hat = packed_with(w, fmt, scale, zero).dequantize(torch.float32)
    g = torch.randn(1, 6)
    step = 1.5
    new = v_step(w_hat, g, scale, zero, fmt, normalized_eta(g, scale, step), k)
    eta = step * scale.item() / g.pow(2).mean().sqrt().item()

    def phi(v):
        return float((g * (v - w_hat)).sum() + ((v - w_hat) ** 2).sum() / (2 * eta))

    levels = _grid(fmt, scale.item(), None if zero is None else zero.item(), 6).tolist()
    # each value: its own level or a neighbouring one (the V step's trust region)
    at = [min(range(len(levels)), key=lambda i, v=v: abs(levels[i] - v)) for v in w_hat[0].tolist()]
    choices = [levels[max(i - 1, 0) : i + 2] for i in at]
    best = min(
        phi(torch.tensor([cand]))
        for cand in itertools.product(*choices)
        if sum(c != levels[i] for c, i in zip(cand, at)) <= k
    )
    assert int((new != w_hat).sum()) <= k
    assert math.isclose(phi(new), best, rel_tol=1e-5, abs_tol=1e-7), (phi(new), best)
    assert all(min(abs(v - lv) for lv in levels) < 1e-6 for v in new[0].tolist())  # still on the grid


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_pv_descends_where_straight_through_does_not(seed):
    """min over 2-bit NF codes of ||X w_hat - y||^2 (one block of 8 weights), from round-to-nearest: V steps
    with eta = 1 / L (L = 2 lambda_max(X^T X)) never raise the loss (phi majorizes it), and alternating them
    with P steps on the scale ends at or below round-to-nearest and below straight-through QAT on latent
    weights (same optimizer and iterations)."""
    torch.manual_seed(seed)
    X = torch.randn(64, 8)
    y = X @ (torch.randn(8) * torch.linspace(0.3, 2.0, 8)) + 0.05 * torch.randn(64)
    fmt = QuantFormatSpec("nf2", block_size=8, double_quant=False).fmt
    w0 = torch.linalg.lstsq(X, y[:, None]).solution[:, 0][None]
    eta = 1 / (2 * torch.linalg.eigvalsh(X.T @ X).max().item())

    def loss(w):
        return ((X @ w[0] - y) ** 2).sum()

    scale = initial_scales(w0, fmt)[0].requires_grad_(True)
    w = packed_with(w0, fmt, scale, None).dequantize(torch.float32).requires_grad_(True)
    rtn = loss(w).item()
    for _ in range(20):  # V steps alone, scale fixed: monotone
        before = loss(w)
        (g,) = torch.autograd.grad(before, [w])
        with torch.no_grad():
            w.copy_(v_step(w, g, scale.detach(), None, fmt, eta, 2))
        assert loss(w).item() <= before.item() * (1 + 1e-6)
    opt = torch.optim.Adam([scale], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss(codes_fixed_quantize(w, scale, None, fmt)).backward()
        old = scale.detach().clone()
        with torch.no_grad():
            w.copy_(v_step(w, w.grad, scale.detach(), None, fmt, eta, 1))
        opt.step()
        snap(w.data, fmt, old, None, scale, None)
        w.grad = None
    pv = loss(codes_fixed_quantize(w, scale, None, fmt)).item()

    spec = QuantFormatSpec("nf2", block_size=8, double_quant=False)
    latent = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([latent], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss(fake_quantize(latent, spec)).backward()
        opt.step()
    ste = loss(fake_quantize(latent.detach(), spec)).item()
    assert pv <= rtn * (1 + 1e-6) and pv < ste, (pv, rtn, ste)


def test_pv_linear_holds_its_codes_and_the_optimizer_leaves_them():
    from slimtune.optim import build_optimizer
    from slimtune.schema import OptimConfig

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    spec = QuantFormatSpec("int3", block_size=32)
    fake = FakeQuantLinear.from_linear(lin, spec, pv=True)
    assert torch.equal(fake.weight, fake.packed().dequantize(torch.float32))  # snapped to round-to-nearest
    opt = build_optimizer(OptimConfig(), list(fake.named_parameters()), 1e-3)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(fake.weight) not in ids and id(fake.qat_scale) in ids and id(fake.bias) in ids
