"""Quartet MXFP4 QAT linear against the authors' reference code (IST-DASLab/Quartet): the QuEST forward
quantizer and the stochastic-rounding backward scale, on literal examples and on random data; stochastic
rounding unbiased; the backward an unbiased estimate of the straight-through gradient with QuEST's trust mask.

Reference: https://github.com/IST-DASLab/Quartet at commit 00ccd38e544ac5fd56b7837844a427114b884ef8,
  src/models/quantization/quantizers/mxfp4.py         QuestMXFP4QuantizerFn (forward: quest=True,
                                                       gaussian_scale=2.92247856 / 6.0, round to nearest,
                                                       clip mask), AlbertTsengQuantizerFn (backward: quest=False,
                                                       gaussian_scale=3/4, stochastic rounding)
  src/models/quantization/quantizers/mxfp4_triton.py  mxfp4_forward_kernel (the arithmetic transcribed below)
"""

import math

import pytest
import torch
import torch.nn as nn

from slimtune.kernels.mxfp4 import dequantize_mxfp4_reference
from slimtune.precision import quartet
from slimtune.precision.quartet import QuartetLinear, quest_quantize, sr_dequantized

# --- the authors' code, transcribed -------------------------------------------------------------------------

# mxfp4.py, QuestMXFP4QuantizerFn.forward: gaussian_scale=2.92247856 / 6.0 (QuEST); AlbertTsengQuantizerFn: 3/4
AUTHORS_QUEST_GAUSSIAN_SCALE = 2.92247856 / 6.0
AUTHORS_SR_GAUSSIAN_SCALE = 3 / 4
AUTHORS_RTN_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # strict ">" in the kernel: ties round down


def sylvester_hadamard(n: int) -> torch.Tensor:
    """hadamard_transform(torch.eye(n), scale=n**-0.5) of fast_hadamard_transform, which the authors use
    as their hadamard_matrix: the Sylvester-ordered Walsh-Hadamard matrix / sqrt(n) (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / math.sqrt(n)


def authors_quest_forward(x: torch.Tensor, hadamard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcription in float64 of mxfp4_forward_kernel(..., quest=True, stochastic_round=False,
    gaussian_scale=2.92247856 / 6.0, return_clip_mask=True) (mxfp4_triton.py, commit above): returns the
    dequantized x @ H and the clip mask, both of x's shape."""
    x_had = x.double().reshape(-1, 32) @ hadamard.double()  # x_had = tl.dot(x, hadamard_matrix)
    g = x_had.reshape(-1, 32)  # group_size=32
    mean_squared = (g * g).sum(-1, keepdim=True) / 32
    mean = g.sum(-1, keepdim=True) / 32
    std = torch.sqrt(mean_squared - mean * mean)
    scales = AUTHORS_QUEST_GAUSSIAN_SCALE * std + 1e-8
    shared_exps = torch.exp2(torch.floor(torch.log2(scales)))
    scaled = g / shared_exps
    a = scaled.abs()
    sign = torch.where(scaled > 0, 1.0, -1.0)
    t = AUTHORS_RTN_THRESHOLDS
    fp4 = torch.where(
        a > t[6],
        6.0,
        torch.where(
            a > t[5],
            4.0,
            torch.where(
                a > t[4],
                3.0,
                torch.where(
                    a > t[3],
                    2.0,
                    torch.where(a > t[2], 1.5, torch.where(a > t[1], 1.0, torch.where(a > t[0], 0.5, 0.0))),
                ),
            ),
        ),
    )
    fp4 = fp4 * sign
    return (fp4 * shared_exps).reshape(x.shape), (a < 6).reshape(x.shape)


def authors_sr_candidates(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Transcription in float64 of mxfp4_forward_kernel(..., quest=False, stochastic_round=True,
    gaussian_scale=3/4) with an identity hadamard_matrix (slimtune's sr_dequantized takes already-rotated
    input): (value if rounded down, value if rounded up, probability of rounding up), each of x's shape."""
    g = x.double().reshape(-1, 32)
    scales = g.abs().amax(-1, keepdim=True)
    shared_exps = torch.exp2(torch.floor(torch.log2(scales)) - 2) / AUTHORS_SR_GAUSSIAN_SCALE
    a = (g / shared_exps).abs()
    sign = torch.where(g > 0, 1.0, -1.0)
    high = torch.where(
        a > 4,
        6.0,
        torch.where(
            a > 3,
            4.0,
            torch.where(
                a > 2, 3.0, torch.where(a > 1.5, 2.0, torch.where(a > 1.0, 1.5, torch.where(a > 0.5, 1.0, 0.5)))
            ),
        ),
    )
    low = torch.where(
        a > 4,
        4.0,
        torch.where(
            a > 3,
            3.0,
            torch.where(
                a > 2, 2.0, torch.where(a > 1.5, 1.5, torch.where(a > 1.0, 1.0, torch.where(a > 0.5, 0.5, 0.0)))
            ),
        ),
    )
    prob_up = (a - low) / (high - low)
    return tuple(t.reshape(x.shape) for t in (low * shared_exps * sign, high * shared_exps * sign, prob_up))


def off_the_edges(x: torch.Tensor, hadamard: torch.Tensor) -> None:
    """fp32 (slimtune) and float64 (the transcription) agree unless a block scale sits on a power of two or
    a scaled value on a rounding threshold (where the authors round ties down and slimtune ties to even):
    make sure the random inputs below are nowhere near either."""
    g = (x.double().reshape(-1, 32) @ hadamard.double()).reshape(-1, 32)
    std = torch.sqrt((g * g).mean(-1, keepdim=True) - g.mean(-1, keepdim=True) ** 2)
    log_scale = torch.log2(AUTHORS_QUEST_GAUSSIAN_SCALE * std + 1e-8)
    assert (log_scale - log_scale.round()).abs().min() > 1e-5
    a = (g / torch.exp2(torch.floor(log_scale))).abs()
    assert min((a - t).abs().min().item() for t in AUTHORS_RTN_THRESHOLDS + (6.0,)) > 1e-5


def dequantized_quest(x: torch.Tensor):
    packed, scales, mask = quest_quantize(x)
    return dequantize_mxfp4_reference(packed, scales), mask


# --- tests ---------------------------------------------------------------------------------------------------


def test_constants_are_the_authors():
    assert quartet.QUEST_SCALE == AUTHORS_QUEST_GAUSSIAN_SCALE
    assert quartet.SR_HEADROOM == AUTHORS_SR_GAUSSIAN_SCALE


def test_quest_literal_examples():
    """Blocks worked out by hand from the authors' kernel (mean, E[x^2] -> std -> scale -> thresholds).

    Block A: x_i = (2i - 31) / 8, i = 0..31 (+-1/8 .. +-31/8): mean 0, std = sqrt((32^2 - 1) / 12) / 4 =
    2.3083, 0.48708 * std = 1.1243 -> shared exponent 2^0 = 1; every |x| is an odd multiple of 1/8, never
    a threshold: 1/8 -> 0, 3/8, 5/8 -> 0.5, 7/8, 9/8 -> 1, 11/8, 13/8 -> 1.5, 15/8 .. 19/8 -> 2,
    21/8 .. 27/8 -> 3, 29/8, 31/8 -> 4; nothing clipped.
    Block B: (8, 0 x 31): mean 0.25, E[x^2] = 2, std = sqrt(1.9375) = 1.3919, 0.48708 * std = 0.6780 ->
    2^-1; 8 / 0.5 = 16 > 5 -> 6, i.e. 3.0, and clipped (16 >= 6: mask False); the zeros stay 0.
    Block C: -B."""
    a_in = torch.tensor([(2 * i - 31) / 8 for i in range(32)])
    a_mag = [0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0]
    a_out = torch.tensor([-v for v in reversed(a_mag)] + a_mag)
    b_in = torch.tensor([8.0] + [0.0] * 31)
    b_out = torch.tensor([3.0] + [0.0] * 31)
    x = torch.stack([a_in, b_in, -b_in])
    want = torch.stack([a_out, b_out, -b_out])
    want_mask = torch.ones(3, 32, dtype=torch.bool)
    want_mask[1:, 0] = False
    ident = torch.eye(32, dtype=torch.float64)
    authors, authors_mask = authors_quest_forward(x, ident)  # the transcription agrees with the hand values
    assert torch.equal(authors.float(), want) and torch.equal(authors_mask, want_mask)
    got, mask = dequantized_quest(x)
    assert torch.equal(got, want) and torch.equal(mask, want_mask)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 37.0])
def test_quest_quantize_matches_the_authors_kernel(scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g) * scale
    x[:, ::37] *= 8  # outliers: some values clip (trust mask False)
    ident = torch.eye(32, dtype=torch.float64)
    off_the_edges(x, ident)
    want, want_mask = authors_quest_forward(x, ident)
    got, mask = dequantized_quest(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(mask, want_mask) and 0 < (~mask).sum() < mask.numel() * 0.2


def test_stochastic_rounding_uses_the_authors_scale_and_neighbours():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-3, 3, 64)
    low, high, prob_up = authors_sr_candidates(x)
    n = 3000
    draws = torch.stack([sr_dequantized(x) for _ in range(n)]).double()
    is_low = torch.isclose(draws, low, rtol=1e-6, atol=0)
    is_high = torch.isclose(draws, high, rtol=1e-6, atol=0)
    assert (is_low | is_high).all()  # every draw is one of the authors' two candidates
    up = (is_high & ~is_low).double().mean(0)
    between = (prob_up > 0) & (prob_up < 1)
    assert between.float().mean() > 0.9
    # the frequency of rounding up is the authors' prob_up (binomial noise of n draws: sd <= 0.5 / sqrt(n))
    assert (up - prob_up)[between].abs().max() < 5 * 0.5 / n**0.5


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
    """Forward: Y = Q(X H) Q(W H)^T + b with Q the authors' QuEST quantizer (their QuestMXFP4Quantizer
    applied to X and W). Backward: unbiased for the STE gradient with the authors' trust mask
    (QuestMXFP4QuantizerFn.backward: (grad * mask) @ H^T)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    x = torch.randn(40, 64, requires_grad=True)
    m = QuartetLinear.from_linear(lin)
    y = m(x)
    h32 = sylvester_hadamard(32)
    off_the_edges(x.detach(), h32)
    off_the_edges(lin.weight.detach(), h32)
    xq, mask_x = (t.float() if t.is_floating_point() else t for t in authors_quest_forward(x.detach(), h32))
    wq, mask_w = (t.float() if t.is_floating_point() else t for t in authors_quest_forward(lin.weight.detach(), h32))
    torch.testing.assert_close(y, xq @ wq.t() + lin.bias, rtol=1e-5, atol=1e-5)
    h = torch.block_diag(*[h32.float()] * 2)  # (64, 64): the block-32 rotation of a whole row
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
