"""Learned block scales for QAT (qat.learn_scales=true): LSQ (Esser et al. 2020) / EfficientQAT (Chen et al.
2024) on slimtune's block-wise packed formats (nf2, nf3, int2..int7, int2a..int8a).

Each block b of the flattened weight keeps a trainable scale s_b (NF: its absmax; INT: the grid step) and,
asymmetric INT, a trainable zero z_b, initialised to the format's own. In forward the weight is coded against
them exactly as `slimtune quantize` codes against its computed scales (packed.quantize(w, fmt, scale, zero)),
then dequantized (double quantization, when on, rounds the stored scales as it does there), so the converted
PackedLinear holds these codes and scales bit for bit. Backward, with u the value in grid units
(NF: w / s, INT: w / s, asymmetric (w - z) / s), q(u) its grid value and `in` whether u lies inside the grid:

    d w_hat / d w = in                      (clipped values get no gradient)
    d w_hat / d s = q(u) - u * in           (LSQ's step-size gradient)
    d w_hat / d z = 1 - in                  (asymmetric)
"""

from __future__ import annotations

import torch

from slimtune.quant.intk import int_qmax
from slimtune.quant.packed import PACKED_METHODS, quantize, with_scales
from slimtune.quant.qformat import QuantFormat

LEARNABLE_METHODS = PACKED_METHODS  # the formats that store plain block scales (nf4 / int8 have their own layout)


@torch.no_grad()
def initial_scales(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The format's own fp32 block scales (and zeros) of `w`: where learning starts."""
    packed = quantize(w, fmt)
    return packed.block_scale().clone(), (packed.block_zero().clone() if fmt.kind == "int_asym" else None)


def stored(scale: torch.Tensor, zero: torch.Tensor | None) -> tuple:
    """fp32 (scale clamped at 0: a block whose scale reaches 0 is 0, zero): what a learned scale / zero is stored as."""
    return scale.detach().float().clamp(min=0), None if zero is None else zero.detach().float()


def packed_with(w: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, zero: torch.Tensor | None):
    """The PackedWeight of `w` coded against `scale` and `zero` as stored: what the converted model stores."""
    return quantize(w, fmt, *stored(scale, zero))


def recode(w: torch.Tensor, fmt: QuantFormat, scale, zero, new_scale, new_zero=None):
    """The PackedWeight holding `w`'s codes against `scale` / `zero`, stored with `new_scale` / `new_zero`."""
    return with_scales(fmt, tuple(w.shape), packed_with(w, fmt, scale, zero).codes, *stored(new_scale, new_zero))


def grid_values(w: torch.Tensor, fmt: QuantFormat, scale, zero) -> torch.Tensor:
    """(nb, B) fp32: q, the unscaled grid value of each value's code against `scale` / `zero` (NF: its code
    value; INT: code - qmax; asymmetric: the code)."""
    unit = recode(w, fmt, scale, zero, torch.ones_like(scale), None if zero is None else torch.zeros_like(zero))
    return unit.dequantize(torch.float32).reshape(scale.numel(), -1)


def _grid(w: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, zero: torch.Tensor | None):
    """(u, q(u), in) per value: the value in grid units, its grid value, whether it lies inside the grid."""
    blocks = w.detach().float().reshape(scale.numel(), -1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    u = blocks / safe if zero is None else (blocks - zero[:, None]) / safe
    lo, hi = (0, int_qmax(fmt.bits, False)) if fmt.kind == "int_asym" else (-1, 1)
    if fmt.kind == "int":
        lo, hi = -int_qmax(fmt.bits, True), int_qmax(fmt.bits, True)
    return u, grid_values(w, fmt, scale, zero), (u >= lo) & (u <= hi)


class _LearnedScales(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, zero, fmt):
        ctx.save_for_backward(w, scale, zero if zero is not None else scale.new_empty(0))
        ctx.fmt, ctx.has_zero = fmt, zero is not None
        return packed_with(w, fmt, scale, zero).dequantize(torch.float32).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, scale, zero = ctx.saved_tensors
        zero = zero if ctx.has_zero else None
        g = grad.float().reshape(scale.numel(), -1)
        s = scale.detach().float().clamp(min=0)
        u, q, inside = _grid(w, ctx.fmt, s, None if zero is None else zero.detach().float())
        inside_f = inside.float()
        grad_w = (g * inside_f).view(w.shape).to(w.dtype)
        grad_s = (g * (q - u * inside_f)).sum(1).to(scale.dtype)
        grad_z = (g * (1 - inside_f)).sum(1).to(zero.dtype) if zero is not None else None
        return grad_w, grad_s, grad_z, None


def learned_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat):
    """`w` (out, in) coded against the learned `scale` / `zero` and dequantized; gradients as the module says."""
    return _LearnedScales.apply(w, scale, zero, fmt)
