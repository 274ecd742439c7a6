"""MXFP4 (OCP Microscaling v1.0): quantize, dequantize, and a dequantize-and-matmul GEMM.

Format. Blocks of 32 consecutive values along the last dim share one E8M0 scale: a uint8 biased
exponent, scale = 2^(code - 127) (code 255 is NaN). Elements are FP4 E2M1 codes 0..15: bit 3 is the
sign, bits 2-1 the exponent, bit 0 the mantissa, so codes 0..7 are +{0, 0.5, 1, 1.5, 2, 3, 4, 6}
and codes 8..15 their negatives. Two codes share a byte: the even element in the low nibble, the
odd one in the high nibble (the OCP/torchao convention). 32 values cost 16 bytes + 1 scale byte:
4.25 bits per value, 3.76x smaller than bf16.

Shared exponent (OCP spec, as used by Quartet): scale = 2^(floor(log2(amax)) - 2), 2 being the
largest E2M1 exponent. amax/scale then lies in [4, 8), so magnitudes above 6 saturate to 6 (clamp,
no overflow). The exponent is clamped to [-127, 125]; an all-zero block (or one with amax < 2^-125)
gets code 0 (2^-127). Inputs must be finite.

Rounding: "nearest" is round-to-nearest-even on the E2M1 grid (ties go to the even code, e.g.
5 -> 4, 0.25 -> 0); "stochastic" rounds up with probability (v - lo) / (hi - lo), unbiased below
the saturation point. The reference draws from a torch.Generator, the kernel from tl.rand(seed),
so only RTN is bit-identical between the two.
"""

from __future__ import annotations

import torch

from slimtune.kernels.dispatch import interpreting, triton_enabled, use_triton

if triton_enabled():
    import triton
    import triton.language as tl

BLOCK_SIZE = 32  # values per shared scale (fixed by the spec)
QUANT_BLOCKS_PER_PROGRAM = 64  # 64 blocks x 32 values = 2048 elements per quantize program
# E2M1 magnitudes of codes 0..7; also the decode table of the reference.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
ROUNDINGS = ("nearest", "stochastic")


# ----------------------------------------------------------------------------- torch reference
def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes: (..., D) uint8 in 0..15, D even -> (..., D/2) uint8, even element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """packed: (..., D/2) uint8 -> (..., D) uint8 codes in 0..15 (inverse of pack_fp4)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _e8m0_code(amax: torch.Tensor) -> torch.Tensor:
    """amax: fp32 >= 0 -> int32 scale code = floor(log2(amax)) - 2 + 127, clamped to [0, 252].

    floor(log2) is read off the fp32 exponent bits, which is exact (log2() is not near powers of
    two) and matches the kernel bit for bit; zero and fp32 subnormals land on the clamp, code 0."""
    exponent_bits = (amax.view(torch.int32) >> 23) & 0xFF
    return (exponent_bits - 2).clamp(min=0)


def _rtn_e2m1(m: torch.Tensor) -> torch.Tensor:
    """m: magnitudes in [0, 6] -> codes 0..7, nearest with ties to the even code (midpoints 0.25,
    1.25, 2.5, 5 round down to an even code; 0.75, 1.75, 3.5 round up to one)."""
    return (
        (m > 0.25).int()
        + (m >= 0.75).int()
        + (m > 1.25).int()
        + (m >= 1.75).int()
        + (m > 2.5).int()
        + (m >= 3.5).int()
        + (m > 5.0).int()
    )


def _floor_e2m1(m: torch.Tensor) -> torch.Tensor:
    """m: magnitudes in [0, 6] -> code of the largest grid point <= m."""
    return sum((m >= v).int() for v in E2M1_VALUES[1:])


def quantize_mxfp4_reference(
    x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., D) float, D % 32 == 0 -> (packed (..., D/2) uint8, scales (..., D/32) uint8)."""
    _check_quantize_args(x, rounding)
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK_SIZE)
    code = _e8m0_code(blocks.abs().amax(dim=-1, keepdim=True))
    # 1/scale = 2^(127 - shared) = 2^(254 - code): exponent field 254 - code in [2, 254], always a
    # normal fp32, so the multiply below is exact.
    inv_scale = ((254 - code) << 23).view(torch.float32)
    m = (blocks.abs() * inv_scale).clamp(max=6.0)
    if rounding == "nearest":
        mag = _rtn_e2m1(m)
    else:
        lo = _floor_e2m1(m)
        table = torch.tensor(E2M1_VALUES + (6.0,), device=x.device)  # step 0 above the top code
        lo_value, step = table[lo], table[lo + 1] - table[lo]
        u = torch.rand(m.shape, generator=generator, device=x.device)
        mag = lo + (u * step < m - lo_value).int()
    codes = (mag | ((blocks < 0).int() << 3)).to(torch.uint8).flatten(-2)
    return pack_fp4(codes), code.squeeze(-1).to(torch.uint8)


def _scale_from_code(code: torch.Tensor) -> torch.Tensor:
    """E8M0 code (int32) -> fp32 2^(code - 127) = exponent field `code`. Setting the top mantissa
    bit turns code 0 into the subnormal 2^-127 and code 255 (inf bits) into NaN."""
    bits = code << 23
    return torch.where((code == 0) | (code == 255), bits | (1 << 22), bits).view(torch.float32)


def dequantize_mxfp4_reference(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """packed: (..., D/2) uint8, scales: (..., D/32) uint8 -> (..., D) `dtype`."""
    if packed.shape[:-1] != scales.shape[:-1] or packed.shape[-1] != scales.shape[-1] * BLOCK_SIZE // 2:
        raise ValueError(
            f"packed {tuple(packed.shape)} and scales {tuple(scales.shape)} do not match: "
            f"want packed (..., D/2) and scales (..., D/32)"
        )
    codes = unpack_fp4(packed).long()
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=packed.device)
    values = table[codes].reshape(*scales.shape, BLOCK_SIZE)
    scale = _scale_from_code(scales.to(torch.int32)).unsqueeze(-1)
    return (values * scale).flatten(-2).to(dtype)


def mxfp4_matmul_reference(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x: (..., K) float, w_packed: (N, K/2) uint8, w_scales: (N, K/32) uint8 -> (..., N) = x @ W.T,
    computed in fp32 (the whole W is materialized: this is the memory-hungry baseline)."""
    _check_matmul_args(x, w_packed, w_scales)
    w = dequantize_mxfp4_reference(w_packed, w_scales, torch.float32)
    return (x.float() @ w.T).to(out_dtype or x.dtype)


def _check_quantize_args(x: torch.Tensor, rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: use one of {', '.join(ROUNDINGS)}")
    if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"MXFP4 needs a float tensor whose last dim is a multiple of {BLOCK_SIZE}, got {x.dtype} {tuple(x.shape)}"
        )


def _check_matmul_args(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor) -> None:
    if w_packed.dtype != torch.uint8 or w_scales.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(
            f"w_packed (N, K/2) and w_scales (N, K/32) must be 2-D uint8, got "
            f"{w_packed.dtype} {tuple(w_packed.shape)} and {w_scales.dtype} {tuple(w_scales.shape)}"
        )
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    if x.shape[-1] != k or tuple(w_scales.shape) != (n, k // BLOCK_SIZE):
        raise ValueError(
            f"x {tuple(x.shape)}, w_packed {tuple(w_packed.shape)}, w_scales "
            f"{tuple(w_scales.shape)}: want x (..., K), w_packed (N, K/2), w_scales (N, K/32)"
        )


# ----------------------------------------------------------------------------- Triton kernels
if triton_enabled():
    _KERNEL_BLOCK_SIZE = tl.constexpr(BLOCK_SIZE)  # BLOCK_SIZE, readable inside @triton.jit

    @triton.jit
    def _quantize_e2m1(v, inv_scale, u, STOCHASTIC: tl.constexpr):
        """fp32 values (already in the block) -> uint8 codes 0..15 (same rules as the reference)."""
        m = tl.minimum(tl.abs(v) * inv_scale, 6.0)
        if STOCHASTIC:
            lo = (
                (m >= 0.5).to(tl.int32)
                + (m >= 1.0).to(tl.int32)
                + (m >= 1.5).to(tl.int32)
                + (m >= 2.0).to(tl.int32)
                + (m >= 3.0).to(tl.int32)
                + (m >= 4.0).to(tl.int32)
                + (m >= 6.0).to(tl.int32)
            )
            # grid point and step of code lo: 0.5 apart below 2, then 1 (2..4), then 2 (4..6), 0 at 6
            lo_value = tl.where(lo < 4, lo * 0.5, tl.where(lo < 6, lo - 2.0, tl.where(lo == 6, 4.0, 6.0)))
            step = tl.where(lo < 4, 0.5, tl.where(lo < 6, 1.0, tl.where(lo == 6, 2.0, 0.0)))
            mag = lo + (u * step < m - lo_value).to(tl.int32)
        else:
            mag = (
                (m > 0.25).to(tl.int32)
                + (m >= 0.75).to(tl.int32)
                + (m > 1.25).to(tl.int32)
                + (m >= 1.75).to(tl.int32)
                + (m > 2.5).to(tl.int32)
                + (m >= 3.5).to(tl.int32)
                + (m > 5.0).to(tl.int32)
            )
        return (mag | ((v < 0).to(tl.int32) << 3)).to(tl.uint8)

    @triton.jit
    def _quantize_mxfp4_kernel(
        x_ptr, packed_ptr, scales_ptr, num_blocks, seed, BLOCKS: tl.constexpr, STOCHASTIC: tl.constexpr
    ):
        """One program quantizes BLOCKS blocks of 32 values of the flat input (num_blocks * 32,)."""
        block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
        pair = tl.arange(0, _KERNEL_BLOCK_SIZE // 2)  # (16,) byte index inside a block
        row_mask = (block < num_blocks)[:, None]
        # even/odd elements as two (BLOCKS, 16) tiles: they are the low/high nibbles of the same bytes
        even_offsets = block[:, None] * _KERNEL_BLOCK_SIZE + 2 * pair[None, :]
        even = tl.load(x_ptr + even_offsets, mask=row_mask, other=0.0).to(tl.float32)
        odd = tl.load(x_ptr + even_offsets + 1, mask=row_mask, other=0.0).to(tl.float32)

        amax = tl.max(tl.maximum(tl.abs(even), tl.abs(odd)), axis=1)  # (BLOCKS,)
        exponent_bits = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        code = tl.maximum(exponent_bits - 2, 0)  # see _e8m0_code
        inv_scale = ((254 - code) << 23).to(tl.float32, bitcast=True)[:, None]

        if STOCHASTIC:
            u_even = tl.rand(seed, even_offsets)
            u_odd = tl.rand(seed, even_offsets + 1)
        else:
            u_even = even
            u_odd = odd
        lo = _quantize_e2m1(even, inv_scale, u_even, STOCHASTIC)
        hi = _quantize_e2m1(odd, inv_scale, u_odd, STOCHASTIC)
        tl.store(packed_ptr + block[:, None] * (_KERNEL_BLOCK_SIZE // 2) + pair[None, :], lo | (hi << 4), mask=row_mask)
        tl.store(scales_ptr + block, code.to(tl.uint8), mask=block < num_blocks)


def quantize_mxfp4(
    x: torch.Tensor, rounding: str = "nearest", seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., D) fp32/bf16/fp16, D % 32 == 0 -> (packed (..., D/2) uint8, scales (..., D/32) uint8).

    Stochastic rounding draws from tl.rand(seed, element index) in the kernel (seed=None: one
    draw from torch's default generator) and from a generator seeded with `seed` in the reference."""
    _check_quantize_args(x, rounding)
    if not use_triton(x):
        generator = None
        if seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        return quantize_mxfp4_reference(x, rounding, generator)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    x = x.contiguous()
    num_blocks = x.numel() // BLOCK_SIZE
    packed = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    grid = (triton.cdiv(num_blocks, QUANT_BLOCKS_PER_PROGRAM),)
    _quantize_mxfp4_kernel[grid](
        x, packed, scales, num_blocks, seed, BLOCKS=QUANT_BLOCKS_PER_PROGRAM, STOCHASTIC=rounding == "stochastic"
    )
    return packed, scales


if triton_enabled():

    @triton.jit
    def _scale_from_code_bits(code):
        """int32 E8M0 codes -> fp32 scales, as _scale_from_code."""
        bits = code << 23
        return tl.where((code == 0) | (code == 255), bits | (1 << 22), bits).to(tl.float32, bitcast=True)

    @triton.jit
    def _dequantize_e2m1(codes, scale):
        """uint8 codes 0..15 (any shape) and fp32 scales of the same shape -> fp32 values.

        The fp32 bits are built directly: codes with exponent e > 0 are (1 + m/2) * 2^(e-1), i.e.
        exponent field e + 126 and top mantissa bit m; e == 0 is 0 or 0.5 (exponent field 126)."""
        c = codes.to(tl.int32)
        e = (c >> 1) & 3
        m = c & 1
        bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22)) | ((c & 8) << 28)
        return bits.to(tl.float32, bitcast=True) * scale

    @triton.jit
    def _mxfp4_matmul_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """out[M, N] = x[M, K] @ dequant(w)[N, K].T; w is (N, K/2) packed bytes, scales (N, K/32)."""
        # grouped ordering: GROUP_M row tiles sweep the N tiles together so W tiles stay in L2
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_byte = tl.arange(0, BLOCK_K // 2)  # byte j holds columns 2j (low nibble) and 2j + 1
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                mask=mask_m[:, None] & k_mask[None, :],
                other=0.0,
            )
            byte_col = k0 // 2 + offs_byte
            w_mask = mask_n[:, None] & (byte_col < K // 2)[None, :]
            packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + byte_col[None, :], mask=w_mask, other=0)
            # one scale per 16 bytes; the repeated addresses are served from L1
            code = tl.load(
                s_ptr + offs_n[:, None] * (K // _KERNEL_BLOCK_SIZE) + (byte_col // 16)[None, :], mask=w_mask, other=127
            ).to(tl.int32)
            scale = _scale_from_code_bits(code)
            lo = _dequantize_e2m1(packed & 0xF, scale)
            hi = _dequantize_e2m1(packed >> 4, scale)
            # interleave back to column order: (BLOCK_N, BLOCK_K/2, 2) -> (BLOCK_N, BLOCK_K)
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
            if UPCAST_DOT:  # bf16/fp16 tl.dot is wrong under TRITON_INTERPRET=1: do it in fp32
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
            else:  # E2M1 x power-of-two scale is exact in bf16/fp16 (barring under/overflow)
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=INPUT_PRECISION)
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


def _matmul_blocks(m: int, k: int) -> tuple[int, int, int]:
    """BLOCK_M follows M (decode-sized M wastes little of a 16-row tile); BLOCK_K is a whole
    number of 32-value scale blocks."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_k = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    return block_m, 128 if block_m <= 64 else 64, block_k


def _mxfp4_matmul_triton(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = w_packed.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    block_m, block_n, block_k = _matmul_blocks(m, k)
    # fp32 x follows torch's TF32 switch (off by default), so fp32 matches torch.matmul
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _mxfp4_matmul_kernel[grid](
        x2,
        w_packed.contiguous(),
        w_scales.contiguous(),
        out,
        m,
        n,
        k,
        x2.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        UPCAST_DOT=interpreting(),
        INPUT_PRECISION=precision,
    )
    return out.reshape(*x.shape[:-1], n)


class _MXFP4Matmul(torch.autograd.Function):
    """x @ dequant(W).T through the kernel; the frozen MXFP4 weight gets no gradient."""

    @staticmethod
    def forward(ctx, x, w_packed, w_scales, out_dtype):
        ctx.save_for_backward(w_packed, w_scales)
        ctx.x_dtype = x.dtype
        return _mxfp4_matmul_triton(x, w_packed, w_scales, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        w_packed, w_scales = ctx.saved_tensors
        # grad_x = grad_out @ W: W is dequantized transiently in x's dtype (N * K elements)
        w = dequantize_mxfp4_reference(w_packed, w_scales, ctx.x_dtype)
        return grad_out.to(ctx.x_dtype) @ w, None, None, None


def mxfp4_matmul(
    x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x: (..., K) bf16/fp16/fp32, w_packed: (N, K/2) uint8, w_scales: (N, K/32) uint8 -> (..., N).

    The Triton path streams the 4.25-bit weight and dequantizes tiles in registers (fp32
    accumulation), so W is never materialized: the win is for memory-bound (small-M) shapes."""
    _check_matmul_args(x, w_packed, w_scales)
    out_dtype = out_dtype or x.dtype
    if not use_triton(x, w_packed, w_scales):
        return mxfp4_matmul_reference(x, w_packed, w_scales, out_dtype)
    return _MXFP4Matmul.apply(x, w_packed, w_scales, out_dtype)
