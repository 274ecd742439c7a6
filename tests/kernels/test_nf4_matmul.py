"""nf4_matmul: the Triton kernel (TRITON_INTERPRET=1 without CUDA) against its torch reference."""

import pytest
import torch

from slimtune.kernels.dispatch import interpreting
from slimtune.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference
from slimtune.quant.nf4 import quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

# (M, N, K, block_size): ragged M/N, one row, K not a multiple of the tile, blocks straddling rows (K=200, 16)
SHAPES = [(1, 16, 64, 64), (5, 48, 128, 64), (33, 40, 192, 64), (7, 24, 96, 32), (3, 4, 200, 16)]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_KERNELS", "triton")


def _problem(m, n, k, block_size, double_quant, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4(torch.randn(n, k, generator=g).to(DEVICE), block_size, double_quant)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def _assert_close(got, want, dtype):
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert got.dtype == want.dtype and got.shape == want.shape
    assert err < TOL[dtype], f"max error {err:.2e} (relative to {scale:.2f})"


@pytest.mark.parametrize("m,n,k,block_size", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_matches_reference(m, n, k, block_size, double_quant):
    x, w, b = _problem(m, n, k, block_size, double_quant, torch.float32)
    _assert_close(nf4_matmul(x, w, b), nf4_matmul_reference(x, w, b), torch.float32)


@pytest.mark.parametrize("double_quant", [False, True])
def test_no_bias_and_leading_dims(double_quant):
    x, w, _ = _problem(6, 40, 128, 64, double_quant, torch.float32, bias=False)
    x3 = x.view(2, 3, 128)
    y = nf4_matmul(x3, w)
    assert y.shape == (2, 3, 40)
    _assert_close(y, nf4_matmul_reference(x3, w), torch.float32)


def test_bf16_matches_reference():
    x, w, b = _problem(9, 40, 128, 64, True, torch.bfloat16)
    # fp32 math on the bf16-rounded operands; the kernel rounds only its output
    want = nf4_matmul_reference(x.float(), w, b.float()) if DEVICE == "cpu" else nf4_matmul_reference(x, w, b)
    _assert_close(nf4_matmul(x, w, b), want.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("double_quant", [False, True])
def test_grads_match_reference(double_quant):
    x, w, b = _problem(11, 24, 96, 32, double_quant, torch.float32)
    grads = []
    for fn in (nf4_matmul, nf4_matmul_reference):
        xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(xi, w, bi)
        y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y))
        grads.append((xi.grad, bi.grad))
    (gx, gb), (rx, rb) = grads
    _assert_close(gx, rx, torch.float32)
    _assert_close(gb, rb, torch.float32)


def test_reference_backend_is_plain_linear(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_KERNELS", "reference")
    x, w, b = _problem(4, 16, 64, 64, True, torch.float32)
    assert torch.equal(nf4_matmul(x, w, b), torch.nn.functional.linear(x, w.dequantize(), b))


def test_odd_in_features_rejected():
    w = quantize_nf4(torch.randn(2, 3, device=DEVICE), block_size=2, double_quant=False)
    with pytest.raises(AssertionError, match="even in_features"):
        nf4_matmul(torch.randn(1, 3, device=DEVICE), w)


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [False, True])
def test_larger_shape(double_quant):
    x, w, b = _problem(130, 260, 512, 64, double_quant, torch.float32)
    _assert_close(nf4_matmul(x, w, b), nf4_matmul_reference(x, w, b), torch.float32)
