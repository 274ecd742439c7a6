"""MXFP4: the reference against the OCP spec, the Triton kernels against the reference.

Kernel tests run on CUDA, or on CPU under TRITON_INTERPRET=1 (set before triton is imported)."""

import math

import pytest
from slimtune_testutil import use_kernels
import torch

from slimtune.kernels.dispatch import interpreting
from slimtune.kernels.mxfp4 import (
    E2M1_VALUES,
    dequantize_mxfp4_reference,
    mxfp4_matmul,
    mxfp4_matmul_reference,
    pack_fp4,
    quantize_mxfp4,
    quantize_mxfp4_reference,
    unpack_fp4,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def force_triton(monkeypatch):
    use_kernels(monkeypatch, "triton")


def _one_block(*values: float) -> torch.Tensor:
    """(1, 32) fp32 block: `values` first, zeros after."""
    x = torch.zeros(1, 32)
    x[0, : len(values)] = torch.tensor(values)
    return x


def _quantize_one(*values: float) -> tuple[torch.Tensor, int]:
    """Reference RTN of one block -> (dequantized first len(values) entries, scale code)."""
    packed, scales = quantize_mxfp4_reference(_one_block(*values))
    return dequantize_mxfp4_reference(packed, scales)[0, : len(values)], int(scales[0, 0])


def _grid_steps(m: torch.Tensor) -> torch.Tensor:
    """Width of the E2M1 grid interval holding magnitude m (0.5 below 2, 1 below 4, else 2)."""
    return torch.where(m < 2, 0.5, torch.where(m < 4, 1.0, 2.0))


def _scale(scales: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> fp32 2^(code - 127), broadcast over each block's 32 values."""
    return torch.exp2(scales.double() - 127).float().repeat_interleave(32, dim=-1)


# ----------------------------------------------------------------------------- format, reference
def test_e2m1_codes_decode_to_the_spec_grid():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).unsqueeze(0)  # (1, 32)
    values = dequantize_mxfp4_reference(pack_fp4(codes), torch.tensor([[127]], dtype=torch.uint8))
    expected = list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    assert values[0].tolist() == expected * 2
    assert E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@pytest.mark.parametrize(
    "amax, code",
    [
        (6.0, 127),
        (4.0, 127),
        (7.0, 127),
        (8.0, 128),
        (3.0, 126),
        (0.75, 124),
        (2.0**-125, 0),
        (2.0**-130, 0),
        (0.0, 0),
        (2.0**127, 252),
        (3.0e38, 252),
    ],
)
def test_e8m0_scale_is_floor_log2_amax_minus_2(amax, code):
    assert _quantize_one(amax)[1] == code


def test_block_with_amax_6_maps_exactly():
    grid = [6.0, -4.0, 3.0, -2.0, 1.5, 1.0, -0.5, 0.0]
    values, code = _quantize_one(*grid)
    assert code == 127 and values.tolist() == grid
    # the same block scaled by 2^-10 gets code 117 and the same codes
    values, code = _quantize_one(*(v * 2.0**-10 for v in grid))
    assert code == 117 and (values * 2.0**10).tolist() == grid


def test_round_to_nearest_ties_to_even_code():
    # amax 5 -> scale 1 and 5 sits between 4 (code 6) and 6 (code 7): the tie goes to 4
    values, code = _quantize_one(5.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -5.0, -0.75, 0.3, 5.01)
    assert code == 127
    assert values.tolist() == [4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, -4.0, -1.0, 0.5, 6.0]


def test_values_beyond_six_times_scale_saturate():
    values, code = _quantize_one(7.9, -7.5, 1.0)
    assert code == 127 and values.tolist() == [6.0, -6.0, 1.0]


def test_pack_unpack_round_trip_all_codes_and_bytes():
    codes = torch.arange(16, dtype=torch.uint8)
    pairs = torch.cartesian_prod(codes, codes)  # (256, 2): every (even, odd) pair
    packed = pack_fp4(pairs)
    assert torch.equal(packed[:, 0], pairs[:, 0] | (pairs[:, 1] << 4))  # even element: low nibble
    assert torch.equal(unpack_fp4(packed), pairs)
    all_bytes = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(pack_fp4(unpack_fp4(all_bytes)), all_bytes)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dequantize_error_within_format_bound(rounding):
    gen = torch.Generator().manual_seed(0)
    # block magnitudes spread over 2^-20 .. 2^20; heavy tails make some blocks saturate
    x = torch.randn(16, 256, generator=gen) ** 3 * torch.exp2(torch.randint(-20, 20, (16, 1), generator=gen).float())
    packed, scales = quantize_mxfp4_reference(x, rounding, generator=gen)
    deq, scale = dequantize_mxfp4_reference(packed, scales), _scale(scales)
    m = x.abs() / scale
    saturated = m > 6
    assert torch.equal(deq[saturated], 6 * scale[saturated] * x[saturated].sign())
    # half a step for RTN, a whole step for stochastic rounding (it picks either neighbour)
    bound = _grid_steps(m) * scale * (0.5 if rounding == "nearest" else 1.0)
    assert ((deq - x).abs() <= bound)[~saturated].all()
    assert torch.equal(torch.sign(deq[deq != 0]), torch.sign(x[deq != 0]))


def test_argument_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(3, 40\)"):
        quantize_mxfp4_reference(torch.randn(3, 40))
    with pytest.raises(ValueError, match="rounding"):
        quantize_mxfp4(torch.randn(3, 32), rounding="up")
    w_packed, w_scales = quantize_mxfp4_reference(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"x \(2, 32\)"):
        mxfp4_matmul(torch.randn(2, 32), w_packed, w_scales)


# ----------------------------------------------------------------------------- stochastic rounding
def _stochastic_fixture() -> torch.Tensor:
    """(4, 64) values whose blocks all have amax 6 * 2^k, so no value saturates."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(4, 64, generator=gen) * 12 - 6) * torch.exp2(torch.tensor([[-3.0], [0.0], [2.0], [5.0]]))
    x[:, ::32] = 6 * torch.exp2(torch.tensor([[-3.0], [0.0], [2.0], [5.0]]))
    return x


def _check_unbiased(x: torch.Tensor, samples: torch.Tensor, scales: torch.Tensor) -> None:
    """samples: (S, *x.shape) stochastic dequantizations. Each sample is one of the two grid
    neighbours, and the sample mean is within 5 standard errors of x (per-element variance of
    stochastic rounding is (m - lo)(hi - m) * scale^2)."""
    scale = _scale(scales)
    m = x.abs() / scale
    step = _grid_steps(m)
    lo = torch.tensor(E2M1_VALUES)[sum((m >= v).long() for v in E2M1_VALUES[1:])]
    var = (m - lo) * (lo + step - m) * scale**2
    assert (((samples.abs() / scale - lo) == 0) | ((samples.abs() / scale - lo - step) == 0)).all()
    tolerance = 5 * torch.sqrt(var / samples.shape[0]) + 1e-6 * scale
    assert ((samples.double().mean(0) - x.double()).abs() <= tolerance).all()
    assert torch.equal(samples.mean(0)[var == 0], x[var == 0])  # grid points are never moved


def test_stochastic_reference_is_unbiased():
    x = _stochastic_fixture()
    reps = 256
    gen = torch.Generator().manual_seed(2)
    packed, scales = quantize_mxfp4_reference(x.repeat(reps, 1), "stochastic", generator=gen)
    samples = dequantize_mxfp4_reference(packed, scales).reshape(reps, *x.shape)
    _check_unbiased(x, samples, scales[: x.shape[0]])


@needs_kernel
def test_stochastic_kernel_is_unbiased_and_seeded(force_triton):
    x = _stochastic_fixture().to(DEVICE)
    reps = 256  # one launch: each repeated row draws tl.rand at its own offsets
    packed, scales = quantize_mxfp4(x.repeat(reps, 1), "stochastic", seed=3)
    samples = dequantize_mxfp4_reference(packed, scales).reshape(reps, *x.shape).cpu()
    _check_unbiased(x.cpu(), samples, scales[: x.shape[0]].cpu())
    # the scale does not depend on the rounding; the seed fixes the draw
    assert torch.equal(scales, quantize_mxfp4_reference(x.repeat(reps, 1))[1])
    first = packed[: 8 * x.shape[0]]
    assert torch.equal(first, quantize_mxfp4(x.repeat(8, 1), "stochastic", seed=3)[0])
    assert not torch.equal(first, quantize_mxfp4(x.repeat(8, 1), "stochastic", seed=4)[0])


# ----------------------------------------------------------------------------- kernels vs reference
@needs_kernel
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (65, 32), (7, 96), (2, 5, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rtn_kernel_matches_reference_bit_exactly(force_triton, shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-8, 8, shape[:-1] + (1,), generator=gen).float())
    blocks = x.view(-1, 32)
    blocks[0] = 0.0  # an all-zero block: scale code 0
    blocks[-1, :10] = torch.tensor([6.0, 5.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -5.0, 7.5])  # ties, saturation
    if blocks.shape[0] > 2:
        # fp32: amax below 2^-125 (scale code 0, subnormal inputs). Not in bf16 under the interpreter,
        # whose bf16 -> fp32 cast flushes subnormals to zero (the GPU cast is exact); fp16 has no room.
        blocks[1] *= {torch.float32: 2.0**-130, torch.bfloat16: 2.0**-100, torch.float16: 2.0**-12}[dtype]
    x = x.to(dtype).to(DEVICE)
    packed, scales = quantize_mxfp4(x)
    ref_packed, ref_scales = quantize_mxfp4_reference(x)
    assert packed.shape == shape[:-1] + (shape[-1] // 2,) and scales.shape == shape[:-1] + (shape[-1] // 32,)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(packed, ref_packed)


@needs_kernel
def test_rtn_kernel_scale_code_zero_blocks(force_triton):
    x = torch.randn(4, 64) * 2.0**-131
    x[0, 5] = -1.5 * 2.0**-126  # amax exponent field 1: clamps to code 0 too
    x[1] = 0.0
    x[1, :3] = torch.tensor([2.0**-127, -(2.0**-128), 2.0**-149])  # fp32 subnormals, kept by the 2^127 multiply
    packed, scales = quantize_mxfp4(x.to(DEVICE))
    assert (scales == 0).all()
    assert torch.equal(packed.cpu(), quantize_mxfp4_reference(x)[0])
    assert dequantize_mxfp4_reference(packed, scales)[1, :3].tolist() == [2.0**-127, -(2.0**-128), 0.0]


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    packed, scales = quantize_mxfp4_reference(w)
    return packed.to(DEVICE), scales.to(DEVICE)


@needs_kernel
@pytest.mark.parametrize("m, n, k", [(1, 64, 64), (7, 37, 96), (33, 70, 160), (16, 16, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_kernel_matches_reference(force_triton, m, n, k, dtype):
    w_packed, w_scales = _weights(n, k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEVICE)
    out = mxfp4_matmul(x, w_packed, w_scales, out_dtype=torch.float32)
    ref = mxfp4_matmul_reference(x, w_packed, w_scales, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # operands are exact in both paths; only fp32 summation order differs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * math.sqrt(k))
    out_lowp = mxfp4_matmul(x, w_packed, w_scales)
    assert out_lowp.dtype == dtype
    torch.testing.assert_close(out_lowp, ref.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4)


@needs_kernel
def test_matmul_kernel_batched_input_and_input_gradient(force_triton):
    w_packed, w_scales = _weights(24, 64, seed=5)
    x = torch.randn(2, 3, 64, device=DEVICE, requires_grad=True)
    out = mxfp4_matmul(x, w_packed, w_scales)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = mxfp4_matmul_reference(x_ref, w_packed, w_scales)
    (ref * grad_out).sum().backward()
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_reference_backend_runs_without_triton(monkeypatch):
    use_kernels(monkeypatch, "reference")
    x = torch.randn(3, 64)
    packed, scales = quantize_mxfp4(x)
    assert torch.equal(packed, quantize_mxfp4_reference(x)[0])
    # seeded stochastic rounding on the reference path is reproducible
    assert torch.equal(quantize_mxfp4(x, "stochastic", seed=7)[0], quantize_mxfp4(x, "stochastic", seed=7)[0])
    torch.testing.assert_close(mxfp4_matmul(x, packed, scales), x @ dequantize_mxfp4_reference(packed, scales).T)
