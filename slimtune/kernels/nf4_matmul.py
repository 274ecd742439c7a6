"""y = x W^T (+ b) with W stored as NF4 (NF4Operand: plain tensors, e.g. from quant.nf4.NF4Weight.operand()),
dequantized tile by tile in registers.

The torch reference dequantizes the whole weight to x.dtype first (a full (N, K) temporary, 4x the NF4
bytes in bf16); the Triton kernel reads only the packed codes (0.5 byte/value) and the block scales, so
the bf16 weight never exists in memory. Per W tile (BLOCK_N rows, BLOCK_K columns):
  * load BLOCK_K / 2 bytes per row; the high nibble is the first value of the pair (bnb's order);
  * look both nibbles up in the 16-entry NF4 codebook (a tiny LUT load, L1-resident) and multiply by the
    block's absmax, which is either stored fp32 or double-quantized (int8 * scale / 127 + offset, decoded
    in-kernel: no fp32 absmax temporary either);
  * interleave (hi, lo) back into (BLOCK_N, BLOCK_K), cast to x.dtype and feed tl.dot with fp32 accumulation.
Block scales are indexed by flat position // block_size, so any even block_size works as long as K is even
(a byte never straddles two rows). Gradients flow to x (dx = dy W, the same dequantize-on-the-fly in a
second kernel) and to the bias; the frozen NF4 weight gets none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from slimtune.kernels.dispatch import dot_precision, interpreting, tile_size, triton_enabled, use_triton

if triton_enabled():
    import triton
    import triton.language as tl

# Tile sizes for the GPU. Small matrices clip them to the next power of two of the dims (tl.dot needs >= 16).
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
NUM_WARPS = 8
NUM_STAGES = {torch.float32: 2}  # pipeline depth; fp32 tiles need twice the shared memory (default 3)


if triton_enabled():

    @triton.jit
    def _dequant_nf4_tile(
        codes_ptr,
        absmax_ptr,
        absmax_q_ptr,
        absmax_scale_ptr,
        absmax_offset_ptr,
        codebook_ptr,
        rows,
        byte_cols,
        mask,
        K,
        QBLOCK: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        DQ: tl.constexpr,
    ):
        """W[rows, 2 * byte_cols + {0, 1}] in fp32: rows (R,), byte_cols (C,) -> (R, 2C), masked entries 0."""
        flat = rows[:, None].to(tl.int64) * K + 2 * byte_cols[None, :]  # flat index of the pair's first value
        byte = tl.load(codes_ptr + flat // 2, mask=mask, other=0)
        hi = tl.load(codebook_ptr + (byte >> 4).to(tl.int32))
        lo = tl.load(codebook_ptr + (byte & 15).to(tl.int32))
        block = flat // QBLOCK  # both values of a byte share a block (the block size is even)
        if DOUBLE_QUANT:
            q = tl.load(absmax_q_ptr + block, mask=mask, other=0).to(tl.float32)
            scale = tl.load(absmax_scale_ptr + block // DQ, mask=mask, other=0.0)
            absmax = q * (scale / 127) + tl.load(absmax_offset_ptr)
            absmax = tl.where(mask, absmax, 0.0)
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return tl.interleave(hi * absmax, lo * absmax)

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr,
        codes_ptr,
        absmax_ptr,
        absmax_q_ptr,
        absmax_scale_ptr,
        absmax_offset_ptr,
        codebook_ptr,
        bias_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_ym,
        QBLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        DQ: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """y (M, N) = x (M, K) @ W^T; one program per (BLOCK_M, BLOCK_N) output tile, looping over K."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                mask=(rm[:, None] < M) & (rk[None, :] < K),
                other=0.0,
            )
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            w = _dequant_nf4_tile(
                codes_ptr,
                absmax_ptr,
                absmax_q_ptr,
                absmax_scale_ptr,
                absmax_offset_ptr,
                codebook_ptr,
                rn,
                rb,
                (rn[:, None] < N) & (rb[None, :] < K // 2),
                K,
                QBLOCK,
                DOUBLE_QUANT,
                DQ,
            )
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong: do it in fp32 there
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc)
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )

    @triton.jit
    def _nf4_matmul_t_kernel(
        g_ptr,
        codes_ptr,
        absmax_ptr,
        absmax_q_ptr,
        absmax_scale_ptr,
        absmax_offset_ptr,
        codebook_ptr,
        dx_ptr,
        M,
        N,
        K,
        stride_gm,
        stride_dm,
        QBLOCK: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        DQ: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """dx (M, K) = g (M, N) @ W; one program per (BLOCK_M, BLOCK_K) output tile, looping over N."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # == the interleaved column order of the dequantized tile
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(
                g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :],
                mask=(rm[:, None] < M) & (rn[None, :] < N),
                other=0.0,
            )
            w = _dequant_nf4_tile(
                codes_ptr,
                absmax_ptr,
                absmax_q_ptr,
                absmax_scale_ptr,
                absmax_offset_ptr,
                codebook_ptr,
                rn,
                rb,
                (rn[:, None] < N) & (rb[None, :] < K // 2),
                K,
                QBLOCK,
                DOUBLE_QUANT,
                DQ,
            )
            if UPCAST:
                acc = tl.dot(g.to(tl.float32), w, acc)
            else:
                acc = tl.dot(g, w.to(g.dtype), acc, input_precision=PRECISION)
        tl.store(
            dx_ptr + rm[:, None].to(tl.int64) * stride_dm + rk[None, :],
            acc.to(dx_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rk[None, :] < K),
        )


class NF4Operand(NamedTuple):
    """A packed NF4 weight as plain tensors (the kernel knows no quant class). W (n, k), flattened row-major
    in blocks of `block_size`: codes uint8 (n*k/2,) (first value of a pair in the high nibble), codebook fp32
    (16,), and per block either absmax fp32 (nb,) or double-quantized absmax_q int8 (nb,) with
    absmax_scale fp32 (ceil(nb/dq_block),) and absmax_offset fp32 (1,): absmax = q * scale / 127 + offset."""

    codes: torch.Tensor
    codebook: torch.Tensor
    shape: tuple
    block_size: int
    absmax: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    dq_block: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None


def dequantize_reference(w: NF4Operand, dtype: torch.dtype) -> torch.Tensor:
    """(n, k) tensor of `dtype`: codebook[code] * absmax of the value's block, in fp32 then cast."""
    codes = torch.stack([w.codes >> 4, w.codes & 15], dim=1).reshape(-1).long()
    if w.double_quant:
        scale = w.absmax_scale.float().repeat_interleave(w.dq_block)[: w.absmax_q.numel()]
        absmax = w.absmax_q.float() * (scale / 127) + w.absmax_offset.float()
    else:
        absmax = w.absmax.float()
    vals = w.codebook.float()[codes].view(-1, w.block_size) * absmax[:, None]
    return vals.view(w.shape).to(dtype)


def nf4_matmul_reference(x: torch.Tensor, weight: NF4Operand, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K), weight NF4 of shape (N, K), bias (N,) or None -> (..., N) in x.dtype; W dequantized whole."""
    return F.linear(x, dequantize_reference(weight, x.dtype), bias)


def _scale_args(weight: NF4Operand) -> tuple:
    """(absmax, absmax_q, absmax_scale, absmax_offset); unused slots get a valid dummy pointer."""
    if weight.double_quant:
        return weight.absmax_q, weight.absmax_q, weight.absmax_scale.float(), weight.absmax_offset.float()
    absmax = weight.absmax.float()
    return absmax, absmax, absmax, absmax


def _check(x: torch.Tensor, weight: NF4Operand) -> tuple[int, int]:
    """Shape and dtype checks only (no device read: nothing waits for the GPU)."""
    if len(weight.shape) != 2:
        raise ValueError(f"nf4_matmul needs a 2-d NF4 weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, weight shape is {(n, k)}")
    if k % 2:
        raise ValueError(f"nf4_matmul kernel needs an even in_features (two codes per byte), got K={k}")
    if weight.block_size % 2:
        raise ValueError(f"nf4_matmul: NF4 block_size must be even, got {weight.block_size}")
    if weight.codes.dtype != torch.uint8 or not weight.codes.is_contiguous() or weight.codes.numel() * 2 != n * k:
        raise ValueError(
            f"nf4_matmul: codes must be contiguous uint8 of {n * k // 2} bytes, got "
            f"{weight.codes.dtype} {tuple(weight.codes.shape)}"
        )
    return n, k


def nf4_matmul_forward(x2: torch.Tensor, weight: NF4Operand, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (M, K) contiguous -> (M, N) in x2.dtype."""
    (n, k), m = weight.shape, x2.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    bm, bn, bk = tile_size(m, BLOCK_M), tile_size(n, BLOCK_N), tile_size(k, BLOCK_K)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _nf4_matmul_kernel[grid](
        x2,
        weight.codes,
        *_scale_args(weight),
        weight.codebook,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x2.stride(0),
        y.stride(0),
        QBLOCK=weight.block_size,
        HAS_BIAS=bias is not None,
        DOUBLE_QUANT=weight.double_quant,
        DQ=weight.dq_block,
        UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=dot_precision(x2.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES.get(x2.dtype, 3),
    )
    return y


def nf4_matmul_backward(g2: torch.Tensor, weight: NF4Operand) -> torch.Tensor:
    """g2 (M, N) contiguous grad of y -> dx (M, K) = g2 @ W in g2.dtype."""
    (n, k), m = weight.shape, g2.shape[0]
    dx = torch.empty((m, k), dtype=g2.dtype, device=g2.device)
    if m == 0:
        return dx
    # the roles swap: N is the reduction (BLOCK_K-sized steps), K the output columns (BLOCK_N-wide tiles)
    bm, bn, bk = tile_size(m, BLOCK_M), tile_size(n, BLOCK_K), tile_size(k, BLOCK_N)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _nf4_matmul_t_kernel[grid](
        g2,
        weight.codes,
        *_scale_args(weight),
        weight.codebook,
        dx,
        m,
        n,
        k,
        g2.stride(0),
        dx.stride(0),
        QBLOCK=weight.block_size,
        DOUBLE_QUANT=weight.double_quant,
        DQ=weight.dq_block,
        UPCAST=interpreting() and g2.dtype != torch.float32,
        PRECISION=dot_precision(g2.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES.get(g2.dtype, 3),
    )
    return dx


class NF4MatmulFunction(torch.autograd.Function):
    """NF4MatmulFunction.apply(x, weight, bias): Triton y = x W^T + b with grads for x and bias (W is frozen)."""

    @staticmethod
    def forward(ctx, x, weight: NF4Operand, bias):
        n, k = _check(x, weight)
        x2 = x.reshape(-1, k).contiguous()
        ctx.weight, ctx.bias_dtype = weight, None if bias is None else bias.dtype
        bias = bias.contiguous() if bias is not None else None
        return nf4_matmul_forward(x2, weight, bias).view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y):
        weight = ctx.weight
        g2 = grad_y.reshape(-1, weight.shape[0]).contiguous()
        dx = (
            nf4_matmul_backward(g2, weight).view(*grad_y.shape[:-1], weight.shape[1])
            if ctx.needs_input_grad[0]
            else None
        )
        db = g2.float().sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, None, db


def nf4_matmul(x: torch.Tensor, weight: NF4Operand, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K), weight NF4 of shape (N, K), bias (N,) or None -> (..., N) in x.dtype.

    Triton kernel (W dequantized in registers) when use_triton(x, codes), else nf4_matmul_reference."""
    if use_triton(x, weight.codes):
        return NF4MatmulFunction.apply(x, weight, bias)
    return nf4_matmul_reference(x, weight, bias)
