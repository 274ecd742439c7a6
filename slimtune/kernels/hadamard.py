"""Block Hadamard transform: rotate each contiguous block of `block` values along the last dim.

    y[..., j*block:(j+1)*block] = x[..., j*block:(j+1)*block] @ H_block      H_block = sylvester(block) / sqrt(block)

H is orthonormal and symmetric, so the transform preserves norms and is its own inverse. HALO and
QuaRot-style FP8/INT4 training rotate activations and weights with it before quantizing: one
outlier spreads over the whole block, so the block's amax, and with it the quantization step, shrinks.

The Triton kernel is a fast Walsh-Hadamard transform: log2(block) butterfly stages on a
(ROWS, block) register tile, O(block log block) adds per block instead of a block x block matmul.
Each stage is the constant-geometry (Pease) form, which reads the pairs (2i, 2i+1) and writes the
sum to i and the difference to i + block/2; after log2(block) stages the result is in Sylvester order.
"""

from __future__ import annotations

import math

import torch

from slimtune.kernels.dispatch import interpreting, triton_enabled, use_triton
from slimtune.kernels.fp8_matmul import FP8_DTYPES, FP8_MAX, native_fp8, quantize_fp8

if triton_enabled():
    import triton
    import triton.language as tl

MAX_BLOCK = 1024
# Elements per program: 16 KiB of fp32 in registers, spread over 4 warps.
TILE_ELEMENTS = 4096


def _rows_per_program(block: int, n_rows: int) -> int:
    """Rows of `block` values per program: TILE_ELEMENTS in all, fewer when there are few rows."""
    return max(1, min(TILE_ELEMENTS // block, triton.next_power_of_2(n_rows)))


def _check_block(block: int, dim: int) -> None:
    if block < 2 or block > MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block={block}: use a power of two in [2, {MAX_BLOCK}] (32..256 is the usual range)")
    if dim % block:
        raise ValueError(f"last dim {dim} is not a multiple of block={block}")


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """(n, n) orthonormal Sylvester Hadamard matrix: H_1 = [1], H_2n = [[H, H], [H, -H]], / sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n={n}: Sylvester Hadamard matrices exist for powers of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def hadamard_transform_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., D), D % block == 0 -> same shape and dtype; each block rotated by H_block (fp32 math)."""
    _check_block(block, x.shape[-1])
    h = hadamard_matrix(block, device=x.device)
    y = x.float().reshape(-1, block) @ h
    return y.reshape(x.shape).to(x.dtype)


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block Hadamard transform: the Triton kernel on CUDA (or under TRITON_INTERPRET=1), else the reference."""
    if use_triton(x):
        return hadamard_transform_triton(x, block)
    return hadamard_transform_reference(x, block)


def hadamard_transform_triton(x: torch.Tensor, block: int) -> torch.Tensor:
    """Launch the fast Walsh-Hadamard kernel; x fp32/bf16/fp16 (..., D), computed in fp32."""
    _check_block(block, x.shape[-1])
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hadamard_transform: float32/bfloat16/float16 input expected, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n_segments = x.numel() // block
    if n_segments == 0:
        return out
    rows = _rows_per_program(block, n_segments)
    grid = (triton.cdiv(n_segments, rows),)
    _hadamard_kernel[grid](
        x, out, n_segments, 1.0 / math.sqrt(block),
        BLOCK=block, LOG2_BLOCK=block.bit_length() - 1, ROWS=rows, num_warps=4,
    )  # fmt: skip
    return out


def hadamard_quantize_fp8_reference(
    x: torch.Tensor, block: int, fmt: str = "e4m3", axis: int | None = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(rotated x) with the rotation kept in fp32 (never rounded to x.dtype).
    x (..., D) -> (fp8 (..., D), fp32 scale (..., 1) for axis=-1 or () for axis=None)."""
    return quantize_fp8(hadamard_transform_reference(x.float(), block), fmt, axis)


def hadamard_quantize_fp8(
    x: torch.Tensor, block: int, fmt: str = "e4m3", axis: int | None = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate then quantize to fp8 (HALO's forward GEMM operands), fused where triton has fp8 types.
    x (..., D) -> (fp8 (..., D), fp32 scale (..., 1) for axis=-1 or () for axis=None).

    Two passes over x: the first rotates and keeps only each row's amax, the second rotates again and
    writes fp8. The rotated tensor never reaches memory: two reads of x and one byte per value written,
    where transform-then-quantize writes the rotation and reads it back several times."""
    if use_triton(x) and native_fp8(x.device):
        return hadamard_quantize_fp8_triton(x, block, fmt, axis)
    if use_triton(x):  # sm80 and older: the transform kernel, torch's quantizer
        return quantize_fp8(hadamard_transform_triton(x.float(), block), fmt, axis)
    return hadamard_quantize_fp8_reference(x, block, fmt, axis)


def hadamard_quantize_fp8_triton(
    x: torch.Tensor, block: int, fmt: str = "e4m3", axis: int | None = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the amax pass, pick the scales in torch (same formula as quantize_fp8), launch the cast pass."""
    _check_block(block, x.shape[-1])
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt={fmt!r}: use one of {', '.join(FP8_DTYPES)}")
    if axis is not None and axis not in (-1, x.dim() - 1):
        raise ValueError(f"axis={axis!r}: use None (per-tensor) or -1 (per-row)")
    x = x.contiguous()
    dim = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])
    out = torch.empty(x.shape, device=x.device, dtype=FP8_DTYPES[fmt])
    amax = torch.zeros(n_rows, device=x.device, dtype=torch.float32)
    if n_rows and dim:
        rows = _rows_per_program(block, n_rows)
        grid = (triton.cdiv(n_rows, rows),)
        meta = {"BLOCK": block, "LOG2_BLOCK": block.bit_length() - 1, "ROWS": rows, "num_warps": 4}
        _hadamard_amax_kernel[grid](x, amax, n_rows, dim, 1.0 / math.sqrt(block), **meta)
    if axis is None:
        amax = amax.amax() if n_rows else amax.new_zeros(())
    else:
        amax = amax.reshape(*x.shape[:-1], 1)
    scale = (amax / FP8_MAX[fmt]).clamp_min(torch.finfo(torch.float32).tiny)
    if n_rows and dim:
        _hadamard_quantize_kernel[grid](
            x, out, scale.reshape(-1), n_rows, dim, 1.0 / math.sqrt(block), FP8_MAX[fmt],
            PER_ROW=axis is not None, ROUND_IN_FP32=interpreting(), MANT_BITS=3 if fmt == "e4m3" else 2,
            MIN_EXP=-6 if fmt == "e4m3" else -14, **meta,
        )  # fmt: skip
    return out, scale


if triton_enabled():

    @triton.jit
    def _fwht_tile(x, ROWS: tl.constexpr, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr):
        """(ROWS, BLOCK) fp32 -> each row times the unnormalized Sylvester matrix H_BLOCK."""
        for _ in tl.static_range(LOG2_BLOCK):
            even, odd = tl.split(tl.reshape(x, (ROWS, BLOCK // 2, 2)))
            # join -> (ROWS, BLOCK/2, 2) holding (sum, diff) pairs; the permute puts every sum before
            # every diff: out[i] = x[2i] + x[2i+1], out[i + BLOCK/2] = x[2i] - x[2i+1].
            x = tl.reshape(tl.permute(tl.join(even + odd, even - odd), (0, 2, 1)), (ROWS, BLOCK))
        return x

    @triton.jit
    def _hadamard_kernel(
        x_ptr, out_ptr, n_segments, scale,
        BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        """x viewed as (n_segments, BLOCK) contiguous; one program per ROWS segments."""
        segments = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs = segments.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = segments[:, None] < n_segments
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _fwht_tile(x, ROWS, BLOCK, LOG2_BLOCK) * scale
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _hadamard_amax_kernel(
        x_ptr, amax_ptr, n_rows, dim, scale,
        BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        """x (n_rows, dim): amax[r] = max |rotated x[r, :]|, one program per ROWS rows, BLOCK columns a step."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_offs = rows.to(tl.int64)[:, None] * dim
        mask = rows[:, None] < n_rows
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for col in range(0, dim, BLOCK):
            offs = row_offs + col + tl.arange(0, BLOCK)[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = _fwht_tile(x, ROWS, BLOCK, LOG2_BLOCK) * scale
            amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        tl.store(amax_ptr + rows, amax, mask=rows < n_rows)

    @triton.jit
    def _round_to_fp8_grid(v, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
        """Round fp32 v to the nearest fp8 value (ties to even), kept in fp32: adding
        1.5 * 2^(e - MANT_BITS + 23), e = max(exponent of v, MIN_EXP), to |v| drops exactly the bits of |v|
        below the fp8 step 2^(e - MANT_BITS). Only for the interpreter, whose fp32 -> fp8 cast halves values
        whose rounding carries into the exponent (126.04 -> 64 instead of 128); an exact value casts right."""
        bits = v.to(tl.int32, bitcast=True)
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)
        magic = (((exponent - MANT_BITS + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
        rounded = (tl.abs(v) + magic) - magic
        return tl.where(bits < 0, -rounded, rounded)  # the sign bit: -0.0 and values rounding to it stay -0.0

    @triton.jit
    def _hadamard_quantize_kernel(
        x_ptr, out_ptr, scale_ptr, n_rows, dim, h_scale, fp8_max,
        PER_ROW: tl.constexpr, ROUND_IN_FP32: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
        BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        """out = fp8(clamp(rotated x / scale)), scale per row (n_rows,) or one value."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_offs = rows.to(tl.int64)[:, None] * dim
        mask = rows[:, None] < n_rows
        if PER_ROW:
            q_scale = tl.load(scale_ptr + rows, mask=rows < n_rows, other=1.0)[:, None]
        else:
            q_scale = tl.load(scale_ptr)
        for col in range(0, dim, BLOCK):
            offs = row_offs + col + tl.arange(0, BLOCK)[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = _fwht_tile(x, ROWS, BLOCK, LOG2_BLOCK) * h_scale
            # div_rn: IEEE division like torch's (triton's `/` is the approximate div.full.f32).
            q = tl.minimum(tl.maximum(tl.math.div_rn(y, q_scale), -fp8_max), fp8_max)
            if ROUND_IN_FP32:
                q = _round_to_fp8_grid(q, MANT_BITS, MIN_EXP)
            tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
