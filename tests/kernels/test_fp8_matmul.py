"""FP8 quantization and the scaled FP8 GEMM: quantize_fp8 against the formats' rounding bounds, the
torch reference against an fp32 matmul, the Triton kernel against the reference (CUDA, or CPU under
TRITON_INTERPRET=1 from conftest.py), and on CUDA against torch._scaled_mm."""

import pytest
from slimtune_testutil import use_kernels
import torch

from slimtune.kernels.dispatch import interpreting
from slimtune.kernels.fp8_matmul import (
    FP8_DTYPES,
    FP8_MAX,
    dequantize_fp8,
    fp8_matmul,
    fp8_matmul_reference,
    fp8_matmul_triton,
    quantize_fp8,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")

# Rounding to nearest: relative error <= 2^-(mantissa bits + 1) for normal values; below the smallest
# normal the grid step is fixed, so the error is <= half of it (in units of the scale).
REL_BOUND = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
SUBNORMAL_BOUND = {"e4m3": 2.0**-10, "e5m2": 2.0**-17}

# (M, N, K): ragged against the interpreter's 16 x 16 x 32 tile, one row, and several K steps
SHAPES = [(17, 23, 40), (64, 48, 96), (1, 5, 7), (33, 16, 130)]
SCALES = [(None, None), (-1, -1), (-1, None)]  # quantize axis of a, of b


def _spread_rows(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows whose magnitudes span 1e-3 .. 1e3, so per-row and per-tensor scales differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, rows)[torch.randperm(rows, generator=g), None]


def _operands(m, n, k, axes=(None, None), fmts=("e4m3", "e4m3"), seed=0):
    a = _spread_rows(m, k, seed)
    b = _spread_rows(n, k, seed + 1)
    a_fp8, a_scale = quantize_fp8(a, fmts[0], axes[0])
    b_fp8, b_scale = quantize_fp8(b, fmts[1], axes[1])
    return a, b, (a_fp8.to(DEVICE), a_scale.to(DEVICE), b_fp8.to(DEVICE), b_scale.to(DEVICE))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("axis", [None, -1])
def test_quantize_round_trip_within_format_bound(fmt, axis):
    x = _spread_rows(37, 300)
    x_fp8, scale = quantize_fp8(x, fmt, axis)
    assert x_fp8.dtype == FP8_DTYPES[fmt] and x_fp8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (() if axis is None else (37, 1))
    # each group's amax lands on the format's max
    codes = x_fp8.float().abs()
    group_max = codes.amax() if axis is None else codes.amax(dim=-1)
    assert torch.all(group_max == FP8_MAX[fmt])
    err = (dequantize_fp8(x_fp8, scale) - x).abs()
    bound = REL_BOUND[fmt] * x.abs() + SUBNORMAL_BOUND[fmt] * scale
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-30)


def test_quantize_zero_row_and_bad_arguments():
    x = torch.randn(4, 64)
    x[2] = 0.0
    x_fp8, scale = quantize_fp8(x, "e4m3", axis=-1)
    assert torch.all(x_fp8[2].float() == 0) and torch.isfinite(scale).all() and scale[2] > 0
    assert torch.all(torch.isfinite(dequantize_fp8(x_fp8, scale)))
    with pytest.raises(ValueError, match="fmt"):
        quantize_fp8(x, "e3m4")
    with pytest.raises(ValueError, match="axis"):
        quantize_fp8(x, axis=0)


@pytest.mark.parametrize("fmts", [("e4m3", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e5m2")])
def test_reference_close_to_fp32_matmul(fmts):
    """Elementwise bound: with |da| <= u_a |a| + s_a and |db| <= u_b |b| + s_b per element,
    |a~ b~ - a b| <= da @ |b| + |a| @ db + da @ db (fp32 rounding of the sums adds ~1e-6)."""
    a, b, (a_fp8, a_scale, b_fp8, b_scale) = _operands(24, 20, 96, axes=(-1, -1), fmts=fmts)
    out = fp8_matmul_reference(a_fp8, a_scale, b_fp8, b_scale, torch.float32).cpu()
    da = REL_BOUND[fmts[0]] * a.abs() + SUBNORMAL_BOUND[fmts[0]] * a_scale.cpu()
    db = REL_BOUND[fmts[1]] * b.abs() + SUBNORMAL_BOUND[fmts[1]] * b_scale.cpu()
    bound = da @ b.abs().T + a.abs() @ db.T + da @ db.T
    exact = a.double() @ b.double().T
    slack = 1e-5 * (a.abs() @ b.abs().T)
    assert torch.all((out.double() - exact).abs() <= bound + slack)
    # and the typical error is far below the worst case
    assert (out - exact.float()).norm() / exact.norm() < 0.1


@needs_kernel
@pytest.mark.parametrize("native_fp8_dot", [True, False], ids=["fp8-dot", "fp16-decode"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_kernel_reproduces_every_fp8_code(fmt, native_fp8_dot):
    """All 254 finite codes through the kernel (times 1.0): checks the fp8 loads and the byte decoder,
    subnormals and signed zeros included."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fmt])
    codes = codes[torch.isfinite(codes.float())].reshape(-1, 1).to(DEVICE)
    one = torch.ones(1, 1, dtype=FP8_DTYPES["e5m2"], device=DEVICE)
    scale = torch.ones((), device=DEVICE)
    out = fp8_matmul_triton(codes, scale, one, scale, torch.float32, native_fp8_dot=native_fp8_dot)
    assert torch.equal(out, codes.float())


@needs_kernel
@pytest.mark.parametrize("native_fp8_dot", [True, False], ids=["fp8-dot", "fp16-decode"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("axes", SCALES, ids=["tensor-tensor", "row-row", "row-tensor"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, axes, out_dtype, native_fp8_dot):
    _, _, args = _operands(*shape, axes=axes)
    out = fp8_matmul_triton(*args, out_dtype=out_dtype, native_fp8_dot=native_fp8_dot)
    ref = fp8_matmul_reference(*args, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == shape[:2]
    # same fp8 products, fp32 sums in another order; bf16 may then round one ulp apart
    rtol, atol = (1e-5, 1e-6) if out_dtype == torch.float32 else (2.0**-7, 1e-6)
    scale = ref.float().abs().amax(dim=1, keepdim=True)  # rows span 1e-3..1e3: tolerance per row
    assert torch.all((out.float() - ref.float()).abs() <= rtol * scale + atol)


@needs_kernel
@pytest.mark.parametrize("fmts", [("e4m3", "e5m2"), ("e5m2", "e4m3")])
def test_kernel_mixed_formats(fmts):
    """e4m3 x e5m2: activations x gradients in the backward GEMMs."""
    _, _, args = _operands(19, 21, 72, axes=(-1, None), fmts=fmts)
    out = fp8_matmul_triton(*args, out_dtype=torch.float32)
    ref = fp8_matmul_reference(*args, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@needs_kernel
def test_dispatch(monkeypatch):
    _, _, args = _operands(9, 10, 33, axes=(-1, -1))
    ref = fp8_matmul_reference(*args)
    use_kernels(monkeypatch, "reference")
    assert torch.equal(fp8_matmul(*args), ref)
    use_kernels(monkeypatch, "triton")
    out = fp8_matmul(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2.0**-7, atol=1e-6 * ref.float().abs().max().item())


def test_rejects_bad_inputs():
    a_fp8, a_scale = quantize_fp8(torch.randn(4, 8), axis=-1)
    b_fp8, b_scale = quantize_fp8(torch.randn(5, 8))
    with pytest.raises(ValueError, match="K mismatch"):
        fp8_matmul_reference(a_fp8, a_scale, b_fp8[:, :4], b_scale)
    with pytest.raises(ValueError, match="per-row"):
        fp8_matmul_reference(a_fp8, a_scale[:3], b_fp8, b_scale)
    with pytest.raises(ValueError, match="fp8 inputs"):
        fp8_matmul_reference(a_fp8.float(), a_scale, b_fp8, b_scale)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and hasattr(torch, "_scaled_mm")), reason="CUDA + torch._scaled_mm")
@pytest.mark.parametrize("rowwise", [False, True])
def test_kernel_matches_torch_scaled_mm(rowwise):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs sm89+")
    if rowwise and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row-wise scales in torch._scaled_mm need sm90")
    axis = -1 if rowwise else None
    a_fp8, a_scale = quantize_fp8(torch.randn(256, 512, device="cuda"), axis=axis)
    b_fp8, b_scale = quantize_fp8(torch.randn(384, 512, device="cuda"), axis=axis)
    # _scaled_mm wants b column-major (K, N) and a (1, N) column scale
    b_scale_mm = b_scale.reshape(1, -1) if rowwise else b_scale
    expected = torch._scaled_mm(a_fp8, b_fp8.T, scale_a=a_scale, scale_b=b_scale_mm, out_dtype=torch.bfloat16)
    out = fp8_matmul_triton(a_fp8, a_scale, b_fp8, b_scale, torch.bfloat16)
    atol = 1e-3 * expected.float().abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2.0**-7, atol=atol)
