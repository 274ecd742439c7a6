"""Quartet MXFP4 QAT linear: QuEST forward against the formula, stochastic rounding unbiased, the
backward an unbiased estimate of the straight-through gradient with QuEST's trust mask."""

import pytest
import torch
import torch.nn as nn

from slimtune.kernels.hadamard import hadamard_matrix
from slimtune.kernels.mxfp4 import dequantize_mxfp4_reference
from slimtune.quant.quartet import QuartetLinear, quest_quantize, sr_dequantized

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quest_reference(x: torch.Tensor):
    """QuEST on blocks of 32: s = 2^floor(log2(2.9225/6 * std)), nearest E2M1 point of |x|/s (clipped
    at 6), sign kept; mask = |x|/s < 6."""
    b = x.reshape(-1, 32)
    s = torch.exp2(torch.floor(torch.log2(2.92247856 / 6 * b.std(dim=1, unbiased=False, keepdim=True))))
    v = b / s
    nearest = GRID[(v.abs().clamp(max=6).unsqueeze(-1) - GRID).abs().argmin(-1)]
    return (nearest * v.sign() * s).reshape(x.shape), (v.abs() < 6).reshape(x.shape)


def block_hadamard(n: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard_matrix(32)] * (n // 32))


def test_quest_quantize_matches_formula():
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    packed, scales, mask = quest_quantize(x)
    want, want_mask = quest_reference(x)
    torch.testing.assert_close(dequantize_mxfp4_reference(packed, scales), want)
    assert torch.equal(mask, want_mask) and 0 < (~mask).sum() < mask.numel() * 0.2


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    torch.manual_seed(0)
    x = torch.randn(32, 64) * torch.logspace(-3, 3, 64)  # blocks of very different scales
    draws = torch.stack([sr_dequantized(x) for _ in range(2000)])
    single = (draws[0] - x).norm() / x.norm()
    bias = (draws.mean(0) - x).norm() / x.norm()
    assert bias < 3 * single / 2000**0.5  # the noise of a 2000-draw mean, no systematic part
    lo, hi = draws.min(0).values, draws.max(0).values  # each value rounds to one of its two neighbours
    assert ((draws == lo) | (draws == hi)).all()
    both = lo != hi
    assert (lo[both] <= x[both]).all() and (x[both] <= hi[both]).all()


def test_forward_and_unbiased_ste_backward():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    x = torch.randn(40, 64, requires_grad=True)
    m = QuartetLinear.from_linear(lin)
    y = m(x)
    h = block_hadamard(64)
    xq, mask_x = quest_reference(x.detach() @ h)
    wq, mask_w = quest_reference(lin.weight.detach() @ h)
    torch.testing.assert_close(y, xq @ wq.t() + lin.bias, rtol=1e-5, atol=1e-5)
    e = torch.randn_like(y)
    ste_x = ((e @ wq) * mask_x) @ h.t()
    ste_w = ((e.t() @ xq) * mask_w) @ h.t()
    n, mean_x, mean_w = 400, torch.zeros_like(x), torch.zeros_like(lin.weight)
    for i in range(n):
        x.grad = lin.weight.grad = lin.bias.grad = None
        m(x).backward(e)
        mean_x += x.grad / n
        mean_w += lin.weight.grad / n
        if i == 0:
            single_x = (x.grad - ste_x).norm() / ste_x.norm()
            single_w = (lin.weight.grad - ste_w).norm() / ste_w.norm()
    torch.testing.assert_close(lin.bias.grad, e.sum(0))
    assert single_x > 0.05 and single_w > 0.05  # stochastic: one draw is noisy
    assert (mean_x - ste_x).norm() / ste_x.norm() < 3 * single_x / n**0.5
    assert (mean_w - ste_w).norm() / ste_w.norm() < 3 * single_w / n**0.5


@pytest.mark.parametrize("shape", [(7, 40, 24), (33, 96, 5)])
def test_ragged_shapes_are_padded(shape):
    m, k, n = shape
    lin = nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=True)
    y = QuartetLinear.from_linear(lin)(x)
    assert y.shape == (m, n)
    y.sum().backward()
    assert x.grad.shape == (m, k) and lin.weight.grad.shape == (n, k)
    assert ((y - lin(x)).norm() / lin(x).norm()) < 0.5  # 4-bit QAT: a coarse but faithful forward
