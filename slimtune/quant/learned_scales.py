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
from slimtune.quant.nfk import nf_codebook
from slimtune.quant.packed import PACKED_METHODS, quantize
from slimtune.quant.qformat import QuantFormat

LEARNABLE_METHODS = PACKED_METHODS  # the formats that store plain block scales (nf4 / int8 have their own layout)


@torch.no_grad()
def initial_scales(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The format's own fp32 block scales (and zeros) of `w`: where learning starts."""
    packed = quantize(w, fmt)
    return packed.block_scale().clone(), (packed.block_zero().clone() if fmt.kind == "int_asym" else None)


def packed_with(w: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, zero: torch.Tensor | None):
    """The PackedWeight of `w` coded against `scale` (clamped at 0: a block whose scale reaches 0 is 0) and
    `zero`: what the converted model stores."""
    return quantize(w, fmt, scale.detach().float().clamp(min=0), None if zero is None else zero.detach().float())


def _grid(blocks: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor, zero: torch.Tensor | None):
    """(u, q(u), in) per value: the value in grid units, its grid value (unscaled), inside the grid."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    if fmt.kind == "nf":
        codebook = nf_codebook(fmt.bits, blocks.device)
        u = blocks / safe
        q = codebook[torch.bucketize(u, (codebook[1:] + codebook[:-1]) / 2)]
        return u, q, u.abs() <= 1
    if fmt.kind == "int":
        qmax = int_qmax(fmt.bits, True)
        u = blocks / safe
        return u, torch.round(u).clamp(-qmax, qmax), u.abs() <= qmax
    qmax = int_qmax(fmt.bits, False)
    u = (blocks - zero[:, None]) / safe
    return u, torch.round(u).clamp(0, qmax), (u >= 0) & (u <= qmax)


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
        blocks = w.detach().float().reshape(scale.numel(), -1)
        g = grad.float().reshape(blocks.shape)
        s = scale.detach().float().clamp(min=0)
        u, q, inside = _grid(blocks, ctx.fmt, s, None if zero is None else zero.detach().float())
        inside_f = inside.float()
        grad_w = (g * inside_f).view(w.shape).to(w.dtype)
        grad_s = (g * (q - u * inside_f)).sum(1).to(scale.dtype)
        grad_z = (g * (1 - inside_f)).sum(1).to(zero.dtype) if zero is not None else None
        return grad_w, grad_s, grad_z, None


def learned_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat):
    """`w` (out, in) coded against the learned `scale` / `zero` and dequantized; gradients as the module says."""
    return _LearnedScales.apply(w, scale, zero, fmt)
