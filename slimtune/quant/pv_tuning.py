"""PV-Tuning (Malinovskii et al. 2024) for QAT below 4 bits (qat.pv_tuning=true): codes updated as discrete
variables instead of through a straight-through estimator.

A PV linear holds its packed codes (`qat_codes`, uint8, saved with every checkpoint) and computes with
w_hat = q(codes) * s (+ z); its `weight` stays the continuous straight-through buffer W (the latent weight the
authors' implementation keeps beside the codes). Each step alternates

  P step   the optimizer steps the continuous parameters with the codes fixed: the block scales / zeros
           (d w_hat / d s = q(codes), d w_hat / d z = 1), norms, embeddings, lm_head, and W, which takes the
           gradient of w_hat (d w_hat / d W = 1) with the optimizer's preconditioning and momentum;
  V step   the codes move on the proximal objective  phi(v) = sum_j (v_j - W_j)^2  over the format's grid
           (the paper's linearized step: with a plain SGD buffer W = w_hat - eta g, phi is
           g . (v - w_hat) + |v - w_hat|^2 / (2 eta) up to a constant), each code at most one grid step from
           where it is (a trust region), and at most qat.pv_fraction of the matrix's codes changing per step:
           those whose change lowers phi most (the paper's subspace of a bounded number of changed codes).

W accumulates the optimizer's steps across V steps, so a code changes once W has moved past its rounding
boundary; bounding the changes per step keeps each step's move of w_hat small, which is what keeps training
stable where re-rounding every weight each step (straight-through QAT) is noisy.
"""

from __future__ import annotations

import math

import torch

from slimtune.errors import ConfigError
from slimtune.hooks import Hooks
from slimtune.quant.learned_scales import packed_with, stored
from slimtune.quant.packed import with_scales
from slimtune.quant.packing import pack_bits, unpack_bits
from slimtune.quant.qformat import QuantFormat

PV_METHODS = ("nf2", "nf3", "int2", "int3", "int2a", "int3a")  # the codes of at most 3 bits


def dequantize_codes(codes, shape, fmt: QuantFormat, scale, zero) -> torch.Tensor:
    """fp32 `shape` tensor: packed `codes` on the grid of `scale` / `zero` (clamped at 0, as stored)."""
    return with_scales(fmt, tuple(shape), codes, *stored(scale, zero)).dequantize(torch.float32)


class _CodesFixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, zero, codes, fmt):
        ctx.save_for_backward(scale, codes)
        ctx.fmt, ctx.zero, ctx.shape = fmt, zero, w.shape
        return dequantize_codes(codes, w.shape, fmt, scale, zero).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        scale, codes = ctx.saved_tensors
        g = grad.float().reshape(scale.numel(), -1)
        unit = None if ctx.zero is None else torch.zeros_like(ctx.zero, dtype=torch.float32)
        q = dequantize_codes(codes, ctx.shape, ctx.fmt, torch.ones_like(scale, dtype=torch.float32), unit)
        grad_s = (g * q.reshape(g.shape)).sum(1).to(scale.dtype)
        grad_z = g.sum(1).to(ctx.zero.dtype) if ctx.zero is not None else None
        return grad, grad_s, grad_z, None, None


def codes_fixed_quantize(w, scale, zero, codes, fmt: QuantFormat) -> torch.Tensor:
    """w_hat: `codes` (packed) dequantized with `scale` / `zero`, in w's dtype. Backward: w gets w_hat's gradient
    (the straight-through buffer), the scales d w_hat / d s = q(codes), the zeros d w_hat / d z = 1."""
    return _CodesFixed.apply(w, scale, zero, codes, fmt)


@torch.no_grad()
def v_step(codes, target, scale, zero, fmt: QuantFormat, max_changes: int) -> torch.Tensor:
    """The V step: packed `codes` of an (out, in) matrix moved to the minimiser of sum (v - target)^2 over the
    grid of `scale` / `zero`, each code at most one grid step from its current one and at most `max_changes`
    codes changed; returns the new packed codes."""
    if max_changes <= 0:
        return codes
    shape, n = tuple(target.shape), target.numel()
    current = unpack_bits(codes, fmt.bits, n).int()
    wanted = unpack_bits(packed_with(target, fmt, scale, zero).codes, fmt.bits, n).int()
    moved = torch.minimum(torch.maximum(wanted, current - 1), current + 1)
    new_codes = pack_bits(moved.to(torch.uint8), fmt.bits)
    t = target.detach().float().flatten()
    now = dequantize_codes(codes, shape, fmt, scale, zero).flatten()
    candidate = dequantize_codes(new_codes, shape, fmt, scale, zero).flatten()
    gain = torch.where(moved != current, (now - t) ** 2 - (candidate - t) ** 2, 0)
    k = min(max_changes, int((gain > 0).sum()))
    if not k:
        return codes
    keep = torch.ones(n, dtype=torch.bool, device=gain.device)
    keep[torch.topk(gain, k).indices] = False
    return pack_bits(torch.where(keep, current, moved).to(torch.uint8), fmt.bits)


def check_pv_setting(switch: str, what: str, settings, fraction_key: str, fraction: float) -> None:
    """One-line refusals for a PV-Tuning switch: each (key, value, needed) of `settings` must hold, and the
    fraction of codes changed per step must be in (0, 1]."""
    for key, value, needed in settings:
        if value != needed:
            shown, fix = (str(v).lower() if isinstance(v, bool) else v for v in (value, needed))
            raise ConfigError(
                f"{switch}=true updates the codes of {what} in one process's memory (or DDP), not with "
                f"{key}={shown}: set {key}={fix} or {switch}=false"
            )
    if not 0 < fraction <= 1:
        raise ConfigError(f"{fraction_key}={fraction} must be in (0, 1]")


class PVTuning(Hooks):
    """The V step before each optimizer step (towards the buffers the steps so far have moved; the optimizer then
    takes the P step), so what a step's hooks observe after it is what final/ stores; modules: the PV linears
    (FakeQuantLinear with pv=True)."""

    def __init__(self, modules: list, fraction: float):
        self.modules, self.fraction = modules, fraction

    def before_step(self, optimizer, step: int) -> None:
        for m in self.modules:
            k = math.ceil(self.fraction * m.weight.numel())
            codes = v_step(m.qat_codes, m.weight.detach(), m.qat_scale, m.qat_zero, m.spec.fmt, k)
            m.qat_codes.data.copy_(codes)
