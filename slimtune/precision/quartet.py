"""Quartet MXFP4 training linear (Castro et al. 2025): `train.precision=mxfp4`, quantization-aware.

X (M, K), W (N, K), E = dL/dY (M, N); H = orthonormal block-32 Hadamard (one MXFP4 scale block).

Forward (QuEST rounding): X H and W H are quantized to MXFP4 with the QuEST scale: per block of 32,
s = 2^floor(log2(0.487 * std)) (0.487 = 2.9225 / 6, the MSE-optimal clip of a Gaussian at 4 bits,
rounded down to a power of two so it is a valid E8M0 scale), round to nearest on the E2M1 grid, clip at
6. Y = Q(X H) Q(W H)^T; the weight GEMM goes through `kernels.mxfp4_matmul` (packed 4-bit W).

Backward: straight-through with QuEST's trust mask (no gradient where a value was clipped), and the two
gradient GEMMs in MXFP4 with stochastic rounding after a fresh Hadamard along their inner dim:
    d(XH) = [SR(E H_N) SR(Q(WH)^T H_N)^T] * mask_x,   dX = d(XH) H
    d(WH) = [SR(E^T H_M) SR(Q(XH)^T H_M)^T] * mask_w, dW = d(WH) H
Stochastic rounding uses Quartet's scale (the OCP one divided by 3/4), so nothing saturates and each
product is an unbiased estimate of the STE gradient.
The master weight stays fp32; dims that are not multiples of 32 are zero-padded.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.kernels import mxfp4 as mxk  # a module reference: kernel tests reload it in interpreter mode
from slimtune.kernels.mxfp4 import BLOCK_SIZE, E2M1_VALUES, _floor_e2m1, _rtn_e2m1, dequantize_mxfp4_reference, pack_fp4
from slimtune.precision.fp8 import PrecisionSwap, TrainingLinear, rotate_last
from slimtune.registry import PRECISIONS

dequantize_mxfp4 = dequantize_mxfp4_reference  # elementwise; torch is as fast as a kernel here

QUEST_SCALE = 2.92247856 / 6.0  # Gaussian MSE-optimal clip for 4-bit, over the E2M1 maximum
SR_HEADROOM = 0.75  # backward scale = OCP scale / 0.75: amax / scale in [3, 6), nothing saturates


def quest_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D), D % 32 == 0 (already rotated) -> (packed uint8 (..., D/2), E8M0 scales uint8 (..., D/32),
    trust mask bool (..., D): True where |x| / scale < 6, i.e. not clipped)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK_SIZE)
    std = blocks.std(dim=-1, unbiased=False, keepdim=True)
    exp = torch.floor(torch.log2(QUEST_SCALE * std + 1e-8)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exp)
    mask = (scaled.abs() < 6.0).flatten(-2)
    mag = _rtn_e2m1(scaled.abs().clamp(max=6.0))
    codes = (mag | ((scaled < 0).int() << 3)).to(torch.uint8).flatten(-2)
    return pack_fp4(codes), (exp + 127).squeeze(-1).to(torch.uint8), mask


def sr_dequantized(x: torch.Tensor) -> torch.Tensor:
    """Unbiased stochastic MXFP4 rounding of x (..., D), D % 32 == 0, returned dequantized in fp32.

    Quartet's backward scale s = 2^(floor(log2 amax) - 2) / 0.75 keeps amax / s in [3, 6): nothing
    saturates, so E[result] = x exactly. (The 4/3 is one global factor of the GEMM; the E8M0 part stays
    a power of two.) The OCP scale of `kernels.mxfp4` saturates (6, 8) to 6, which biases SR."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax.clamp_min(2.0**-120))) - 2) / SR_HEADROOM
    m = blocks.abs() / scale
    table = torch.tensor(E2M1_VALUES + (6.0,), device=x.device)
    lo = _floor_e2m1(m)
    lo_value, step = table[lo], table[lo + 1] - table[lo]
    up = torch.rand(m.shape, device=x.device) * step < m - lo_value
    return (torch.where(up, table[lo + 1], lo_value) * scale * blocks.sign()).reshape(x.shape)


def _sr_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, D) @ b (N, D)^T through a fresh randomized Hadamard along D (random signs, then block-32 H,
    the same for both operands so it cancels) and stochastic MXFP4 rounding of both."""
    signs = torch.randint(0, 2, (a.shape[1],), device=a.device).float() * 2 - 1
    a_q = sr_dequantized(rotate_last(a.float() * signs, BLOCK_SIZE))
    b_q = sr_dequantized(rotate_last(b.float() * signs, BLOCK_SIZE))
    return a_q @ b_q.t()


class QuartetLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        k = x2.shape[1]
        xq, xs, mask_x = quest_quantize(rotate_last(x2, BLOCK_SIZE))
        wq, ws, mask_w = quest_quantize(rotate_last(weight, BLOCK_SIZE))
        # Q(XH) is exact in bf16 (E2M1 x 2^e), which the kernel feeds to bf16 tensor cores
        y = mxk.mxfp4_matmul(dequantize_mxfp4(xq, xs, torch.bfloat16), wq, ws, out_dtype=torch.float32)
        if bias is not None:
            y = y + bias.float()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen W (LoRA base): no dW
        ctx.save_for_backward(
            *(xq, xs, mask_w) if need_w else (None,) * 3, *(wq, ws, mask_x) if need_x else (None,) * 3
        )
        ctx.k, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = k, x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        xq, xs, mask_w, wq, ws, mask_x = ctx.saved_tensors
        e = grad_y.reshape(-1, grad_y.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # inner dim N: E (M, N), Q(WH)^T (K', N)
            w_hat = dequantize_mxfp4(wq, ws)
            d_xh = _sr_mm(e, w_hat.t()) * mask_x
            grad_x = rotate_last(d_xh, BLOCK_SIZE)[:, : ctx.k].to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # inner dim M (tokens): E^T (N, M), Q(XH)^T (K', M)
            x_hat = dequantize_mxfp4(xq, xs)
            d_wh = _sr_mm(e.t(), x_hat.t()) * mask_w
            grad_w = rotate_last(d_wh, BLOCK_SIZE)[:, : ctx.k].to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = e.sum(0).to(ctx.w_dtype)
        return grad_x, grad_w, grad_b, None


class QuartetLinear(TrainingLinear):
    """nn.Linear trained through MXFP4 forward/backward GEMMs (same Parameters and state_dict keys)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuartetLinear":
        return cls._share(linear)

    def _run(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return QuartetLinearFunction.apply(x, self.weight, self.bias, out_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mxfp4 (quartet)"


@PRECISIONS.register("mxfp4")
class MXFP4Precision(PrecisionSwap):
    section = None

    @staticmethod
    def swap(linear: nn.Linear, options) -> nn.Module:
        return QuartetLinear.from_linear(linear)
