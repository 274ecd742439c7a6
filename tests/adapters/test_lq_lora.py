"""LQ-LoRA / LoftQ decomposition and the weighted low-rank step, against closed-form references."""

import pytest
import torch

from slimtune.adapters.lq_lora import decompose, fisher_weights, lowrank, weighted_sq_error
from slimtune.quant.nf4 import quantize_nf4


def nf4(w):
    return quantize_nf4(w, 64, double_quant=False)


def quant_only_error(W, q=nf4, dr=None, dc=None):
    return weighted_sq_error(W - q(W).dequantize(), dr, dc)


def matrices():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(96, 128, generator=g)
    # structured: a strong rank-6 part (outlier directions) plus noise, as in trained LLM weights
    low = torch.randn(96, 6, generator=g) @ torch.randn(6, 128, generator=g)
    structured = 2.0 * low + 0.1 * torch.randn(96, 128, generator=g)
    return {"random": random, "structured": structured}


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("start", ["lowrank", "quantize"])
def test_decomposition_never_worse_than_quantizing_alone(kind, start):
    W = matrices()[kind]
    d = decompose(W, nf4, rank=8, max_iters=5, start=start)
    assert d.error <= quant_only_error(W) * (1 + 1e-6)
    # the returned factors reproduce the reported error
    assert d.error == pytest.approx(weighted_sq_error(W - d.packed.dequantize() - d.L1 @ d.L2), rel=1e-5)


def test_structured_matrix_gains_a_lot():
    W = matrices()["structured"]
    d = decompose(W, nf4, rank=8, max_iters=10)
    assert d.error < 0.2 * quant_only_error(W)


def test_lowrank_steps_are_monotone():
    """History alternates Q-step, L-step (no guard): an exact L-step never raises the error."""
    W = matrices()["structured"]
    d = decompose(W, nf4, rank=4, max_iters=8, guard=False, exact=True, rtol=-1.0)
    h = d.history
    assert len(h) >= 4
    for k in range(0, len(h) - 1, 2):
        assert h[k + 1] <= h[k] * (1 + 1e-9)
    assert d.error == min(h)


def test_lowrank_is_the_truncated_svd():
    W = matrices()["random"]
    L1, L2 = lowrank(W, 5, exact=True)
    S = torch.linalg.svdvals(W.double())
    assert weighted_sq_error(W - L1 @ L2) == pytest.approx(float(S[5:].square().sum()), rel=1e-5)
    # randomized SVD is close to the optimum on a matrix with a decaying spectrum
    Ws = matrices()["structured"]
    L1r, L2r = lowrank(Ws, 6)
    Ss = torch.linalg.svdvals(Ws.double())
    assert weighted_sq_error(Ws - L1r @ L2r) <= float(Ss[6:].square().sum()) * 1.05


def test_weighted_lowrank_is_optimal_in_the_weighted_norm():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 60, generator=g)
    dr, dc = torch.rand(40, generator=g) + 0.1, torch.rand(60, generator=g) + 0.1
    L1, L2 = lowrank(W, 4, dr, dc, exact=True)
    tail = torch.linalg.svdvals((W * dr[:, None] * dc[None, :]).double())[4:].square().sum()
    assert weighted_sq_error(W - L1 @ L2, dr, dc) == pytest.approx(float(tail), rel=1e-5)
    P1, P2 = lowrank(W, 4, exact=True)  # the unweighted optimum is worse in the weighted norm
    assert weighted_sq_error(W - L1 @ L2, dr, dc) < weighted_sq_error(W - P1 @ P2, dr, dc)


def test_fisher_weights_are_the_rank1_fisher():
    g = torch.Generator().manual_seed(2)
    u, v = torch.rand(8, generator=g) + 0.1, torch.rand(5, generator=g) + 0.1
    F = u[:, None] * v[None, :]  # a rank-1 Fisher is reproduced exactly
    dr, dc, scale = fisher_weights(F.sum(1), F.sum(0))
    torch.testing.assert_close(scale * (dr[:, None] * dc[None, :]).square(), F, rtol=1e-5, atol=0)
    assert float(dr.square().mean()) == pytest.approx(1.0) and float(dc.square().mean()) == pytest.approx(1.0)


def test_fisher_weighting_lowers_the_weighted_error():
    W = matrices()["random"]
    g = torch.Generator().manual_seed(3)
    rows, cols = torch.rand(96, generator=g) ** 4, torch.rand(128, generator=g) ** 4  # a few rows matter
    dr, dc, _ = fisher_weights(rows, cols)
    weighted = decompose(W, nf4, rank=8, max_iters=4, dr=dr, dc=dc)
    plain = decompose(W, nf4, rank=8, max_iters=4)
    err_plain = weighted_sq_error(W - plain.packed.dequantize() - plain.L1 @ plain.L2, dr, dc)
    assert weighted.error < err_plain
