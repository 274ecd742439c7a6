"""Block Hadamard transform: the torch reference against scipy's Hadamard matrices, the Triton
fast Walsh-Hadamard kernel against the reference (CUDA, or CPU under TRITON_INTERPRET=1 from
conftest.py), and the fused rotate + FP8 quantize against quantize_fp8 of the rotation."""

import math

import pytest
from slimtune_testutil import use_kernels
import scipy.linalg
import torch

import slimtune.kernels.hadamard as hadamard_module
from slimtune.kernels.dispatch import interpreting
from slimtune.kernels.fp8_matmul import FP8_DTYPES
from slimtune.kernels.hadamard import (
    TILE_ELEMENTS,
    hadamard_matrix,
    hadamard_quantize_fp8,
    hadamard_quantize_fp8_reference,
    hadamard_quantize_fp8_triton,
    hadamard_transform,
    hadamard_transform_reference,
    hadamard_transform_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")
BLOCKS = [32, 64, 128, 256]


def _scipy_blockdiag(block: int, dim: int) -> torch.Tensor:
    h = torch.from_numpy(scipy.linalg.hadamard(block)).double() / math.sqrt(block)
    return torch.block_diag(*[h] * (dim // block))


def _inputs(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x.view(-1)[::97] *= 50.0  # a few outliers, as in real activations
    return x.to(dtype)


@pytest.mark.parametrize("n", [1, 2, 32, 256])
def test_hadamard_matrix_is_scipys_orthonormal_matrix(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(h, torch.from_numpy(scipy.linalg.hadamard(n)).double() / math.sqrt(n))
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="powers of two"):
        hadamard_matrix(n + 3 if n > 1 else 3)


@pytest.mark.parametrize("block", BLOCKS)
def test_reference_is_blockdiag_scipy_product_orthonormal_and_self_inverse(block):
    x = _inputs((3, 5, 3 * block))
    y = hadamard_transform_reference(x, block)
    expected = (x.double().reshape(-1, 3 * block) @ _scipy_blockdiag(block, 3 * block)).reshape(x.shape)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    # every block keeps its norm, and H H = I
    block_norms = x.reshape(-1, block).norm(dim=-1)
    torch.testing.assert_close(y.reshape(-1, block).norm(dim=-1), block_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard_transform_reference(y, block), x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bad", [(48, 96), (512 * 4, 512 * 4), (64, 96)], ids=["not-pow2", "too-big", "ragged-dim"])
def test_rejects_bad_block(bad):
    block, dim = bad
    with pytest.raises(ValueError, match="block"):
        hadamard_transform_reference(torch.randn(2, dim), block)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", BLOCKS)
def test_kernel_matches_reference(block, dtype):
    """(3, 7, 2*block): 42 segments, less than one program's tile; (tile + 5, block): a ragged second program."""
    for shape in [(3, 7, 2 * block), (TILE_ELEMENTS // block + 5, block)]:
        x = _inputs(shape, dtype).to(DEVICE)
        out = hadamard_transform_triton(x, block)
        assert out.dtype == dtype and out.shape == x.shape
        ref = hadamard_transform_reference(x, block)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        else:  # both round the same fp32 rotation to bf16; sums in another order may land one ulp apart
            torch.testing.assert_close(out.float(), ref.float(), rtol=2.0**-7, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("block", [32, 256])
def test_kernel_orthonormal_and_self_inverse(block):
    x = _inputs((11, 4 * block)).to(DEVICE)
    y = hadamard_transform_triton(x, block)
    norms = x.reshape(-1, block).norm(dim=-1)
    torch.testing.assert_close(y.reshape(-1, block).norm(dim=-1), norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard_transform_triton(y, block), x, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_dispatch(monkeypatch):
    x = _inputs((5, 128)).to(DEVICE)
    use_kernels(monkeypatch, "reference")
    assert torch.equal(hadamard_transform(x, 64), hadamard_transform_reference(x, 64))
    use_kernels(monkeypatch, "triton")
    torch.testing.assert_close(hadamard_transform(x, 64), hadamard_transform_triton(x, 64))


@needs_kernel
@pytest.mark.parametrize("axis", [-1, None], ids=["per-row", "per-tensor"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("block", [32, 128])
def test_fused_quantize_matches_quantize_of_rotation(block, fmt, axis):
    """Rows spanning 1e-3..1e3 put some per-tensor codes in the subnormal range."""
    x = (_inputs((37, 3 * block)) * torch.logspace(-3, 3, 37)[:, None]).to(DEVICE)
    q, scale = hadamard_quantize_fp8_triton(x, block, fmt, axis)
    q_ref, scale_ref = hadamard_quantize_fp8_reference(x, block, fmt, axis)
    assert q.dtype == FP8_DTYPES[fmt] and q.shape == x.shape and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    # The butterfly and the reference matmul round their fp32 sums differently, so a value within
    # ~1e-6 of a rounding midpoint may take the neighbouring code: allow a handful, one step apart.
    deq, deq_ref = q.float() * scale, q_ref.float() * scale_ref
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert differ.float().mean() < 1e-3
    step = 2.0 ** -(3 if fmt == "e4m3" else 2)
    assert torch.all((deq - deq_ref).abs() <= step * deq_ref.abs() + 2.0**-9 * scale_ref)


@needs_kernel
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fused_quantize_rounds_like_torch_at_every_midpoint(fmt):
    """Every fp8 value, every midpoint between neighbours (ties go to even), and values just either
    side of the midpoints, both signs. With block 4, H = [[1/2 ...]] and x = (t/2, t/2, t/2, t/2)
    rotates to exactly (t, 0, 0, 0); the format's max in the first row makes the scale exactly 1."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fmt]).float()
    grid = codes[torch.isfinite(codes) & (codes >= 0)].unique().double()
    midpoints = (grid[:-1] + grid[1:]) / 2
    targets = torch.cat([grid.flip(0), midpoints, midpoints * (1 + 2.0**-12), midpoints * (1 - 2.0**-12)])
    targets = torch.cat([targets, -targets]).float()
    x = (targets[:, None] / 2).expand(-1, 4).contiguous()
    q, scale = hadamard_quantize_fp8_triton(x.to(DEVICE), 4, fmt, axis=None)
    assert scale.item() == 1.0
    assert torch.equal(q[:, 1:].float().abs().cpu(), torch.zeros(len(targets), 3))
    expected = targets.to(FP8_DTYPES[fmt])  # torch's cast: round to nearest, ties to even
    assert torch.equal(q[:, 0].cpu().view(torch.uint8), expected.view(torch.uint8))


@needs_kernel
def test_fused_dispatch_and_pre_sm89_fallback(monkeypatch):
    x = _inputs((9, 256)).to(DEVICE)
    q, scale = hadamard_quantize_fp8_triton(x, 64)
    q_auto, scale_auto = hadamard_quantize_fp8(x, 64)
    assert torch.equal(q_auto.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale_auto, scale)
    # triton without fp8 types: the transform kernel, then torch's quantizer
    monkeypatch.setattr(hadamard_module, "native_fp8", lambda device: False)
    q_fallback, scale_fallback = hadamard_quantize_fp8(x, 64)
    torch.testing.assert_close(scale_fallback, scale, rtol=1e-5, atol=0)
    assert (q_fallback.view(torch.uint8) != q.view(torch.uint8)).float().mean() < 1e-2
    use_kernels(monkeypatch, "reference")
    q_ref, scale_ref = hadamard_quantize_fp8(x, 64)
    q_expected, scale_expected = hadamard_quantize_fp8_reference(x, 64)
    assert torch.equal(q_ref.view(torch.uint8), q_expected.view(torch.uint8)) and torch.equal(scale_ref, scale_expected)
