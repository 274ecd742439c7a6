"""FP8 / HALO training linear against references built here from torch's float8 casts and explicit
Hadamard matrices (not from the module's own helpers)."""

import pytest
import torch
import torch.nn as nn

from slimtune.kernels.hadamard import hadamard_matrix
from slimtune.precision.fp8 import FP8Linear, FP8LinearFunction

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fake_fp8(t: torch.Tensor, dtype, per_row: bool) -> torch.Tensor:
    """Quantize-dequantize with the scale that maps each row's (or the tensor's) amax to the max."""
    amax = t.abs().amax(dim=-1, keepdim=True) if per_row else t.abs().amax()
    scale = amax.clamp_min(1e-30) / torch.finfo(dtype).max
    return (t / scale).to(dtype).float() * scale


def block_hadamard(n: int, block: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard_matrix(block)] * (n // block))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _run(x, w, b, e, level, block=32):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = FP8LinearFunction.apply(x, w, b, level, block, torch.float32)
    y.backward(e)
    return y, x.grad, w.grad, (b.grad if b is not None else None)


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    m, k, n = 64, 96, 80
    return (
        torch.randn(m, k, generator=g),
        torch.randn(n, k, generator=g) * 0.1,
        torch.randn(n, generator=g),
        torch.randn(m, n, generator=g),
    )


def test_fp8_per_tensor_matches_reference(tensors):
    """fp8: e4m3 X, W and e5m2 E with one scale per tensor, fp32 accumulation."""
    x, w, b, e = tensors
    y, gx, gw, gb = _run(x, w, b, e, None)
    xq, wq, eq = fake_fp8(x, E4M3, False), fake_fp8(w, E4M3, False), fake_fp8(e, E5M2, False)
    torch.testing.assert_close(y, xq @ wq.t() + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, eq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, eq.t() @ xq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, e.sum(0))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_halo_levels_match_reference(tensors, level):
    """HALO: per-row scales along each GEMM's inner dim; level 1 rotates X and W along K, level 2 also
    rotates E along the tokens for dX and rotates the result back."""
    x, w, b, e = tensors
    y, gx, gw, _ = _run(x, w, b, e, level)
    hk, hm = block_hadamard(x.shape[1], 32), block_hadamard(x.shape[0], 32)
    xr, wr = (x @ hk, w @ hk) if level else (x, w)
    torch.testing.assert_close(y, fake_fp8(xr, E4M3, True) @ fake_fp8(wr, E4M3, True).t() + b, rtol=1e-4, atol=1e-4)
    wt = fake_fp8(w.t().contiguous(), E4M3, True)
    want_gx = hm @ (fake_fp8(hm @ e, E5M2, True) @ wt.t()) if level == 2 else fake_fp8(e, E5M2, True) @ wt.t()
    torch.testing.assert_close(gx, want_gx, rtol=1e-4, atol=1e-4)
    want_gw = fake_fp8(e.t().contiguous(), E5M2, True) @ fake_fp8(x.t().contiguous(), E4M3, True).t()
    torch.testing.assert_close(gw, want_gw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("level", [None, 0, 1, 2])
@pytest.mark.parametrize("shape", [(64, 96, 80), (7, 40, 24), (33, 128, 5)])
def test_close_to_fp32_on_ragged_shapes(level, shape):
    """Any M (level 2 pads the tokens), K not a multiple of the block (padded), within fp8's error."""
    m, k, n = shape
    g = torch.Generator().manual_seed(1)
    x, w, e = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, n, generator=g)
    y, gx, gw, _ = _run(x, w, None, e, level)
    assert rel(y, x @ w.t()) < 0.06  # e4m3: 3 mantissa bits on both operands
    assert rel(gx, e @ w) < 0.09 and rel(gw, e.t() @ x) < 0.09  # e5m2: 2 mantissa bits on E


def test_module_shares_parameters_and_state_dict():
    lin = nn.Linear(64, 32)
    m = FP8Linear.from_linear(lin, level=2, block=32)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert m.state_dict().keys() == lin.state_dict().keys()
    assert "halo2" in repr(m)
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16
    assert m(x).shape == (2, 5, 32) and m(x).dtype == torch.float32
    with pytest.raises(ValueError, match="HALO level"):
        FP8Linear.from_linear(lin, level=3)
    with pytest.raises(ValueError, match="power of two"):
        FP8Linear(8, 8, level=1, block=48)


@pytest.mark.parametrize("level", [None, 1])
def test_frozen_weight_skips_the_weight_gemm(monkeypatch, level):
    """LoRA's base path: W frozen, so backward runs the dX GEMM only (2 fp8 GEMMs per step, not 3)."""
    from slimtune.kernels import fp8_matmul as fp8k

    calls = []
    real = fp8k.fp8_matmul
    monkeypatch.setattr(fp8k, "fp8_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    for frozen, want in ((False, 3), (True, 2)):
        calls.clear()
        lin = nn.Linear(32, 16).requires_grad_(not frozen)
        x = torch.randn(4, 32, requires_grad=True)
        FP8Linear.from_linear(lin, level=level, block=32)(x).sum().backward()
        assert len(calls) == want and x.grad is not None and (lin.weight.grad is None) == frozen
