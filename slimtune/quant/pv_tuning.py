"""PV-Tuning (Malinovskii et al. 2024) for QAT below 4 bits (qat.pv_tuning=true): codes updated as discrete
variables instead of through a straight-through estimator.

A PV linear's `weight` always holds its dequantized codes w_hat = q(codes) * s (+ z), so a checkpoint and
the converted model hold exactly the codes. Each step alternates

  P step   the continuous parameters (the block scales / zeros, norms, embeddings, lm_head) take the
           optimizer's step with the codes fixed: d w_hat / d s = q(codes), d w_hat / d z = 1;
  V step   the codes move on the linearized objective with a proximal term, per matrix
               phi(v) = g . (v - w_hat) + sum_j (v_j - w_hat_j)^2 / (2 eta_b)      (v on the format's grid)
           g: the gradient w.r.t. w_hat (the engine's, accumulated and clipped like any other). The paper
           takes eta = 1 / L (L: the loss's smoothness), which makes phi a majorizer of the loss; L is not
           known in training, so eta_b = qat.pv_step * s_b / rms(g): a value with a typical gradient moves
           pv_step grid steps. phi is separable: each value's best code is the grid point nearest its
           target w_hat - eta_b g, taken at most one code from its current one (a trust region: an outlier
           gradient would otherwise throw a value to the end of the grid), and at most qat.pv_fraction x
           lr / train.lr of the matrix's codes change per step, those whose change lowers phi most (the
           paper's subspace of a bounded number of changed codes; the bound follows the lr schedule).

The weight is kept out of the optimizer (`discrete` parameters): the V step is its only update.
"""

from __future__ import annotations

import math

import torch

from slimtune.hooks import Hooks
from slimtune.quant.learned_scales import grid_values, packed_with, recode
from slimtune.quant.packed import with_scales
from slimtune.quant.packing import pack_bits, unpack_bits
from slimtune.quant.qformat import QuantFormat

PV_METHODS = ("nf2", "nf3", "int2", "int3", "int2a", "int3a")  # the codes of at most 3 bits


class _CodesFixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, zero, fmt):
        ctx.save_for_backward(w, scale)
        ctx.fmt, ctx.zero = fmt, zero
        return packed_with(w, fmt, scale, zero).dequantize(torch.float32).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        g = grad.float().reshape(scale.numel(), -1)
        zero = None if ctx.zero is None else ctx.zero.detach().float()
        q = grid_values(w, ctx.fmt, scale.detach().float(), zero)
        grad_z = g.sum(1).to(ctx.zero.dtype) if ctx.zero is not None else None
        return grad, (g * q).sum(1).to(scale.dtype), grad_z, None


def codes_fixed_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat):
    """w (on the grid of scale / zero) dequantized from its codes; the gradient reaches w (for the V step) in
    full, and the scales as d w_hat / d s = q(codes) (the P step)."""
    return _CodesFixed.apply(w, scale, zero, fmt)


def normalized_eta(grad, scale, step: float) -> torch.Tensor | None:
    """eta_b = step * s_b / rms(grad) per block (None when the gradient is 0 or not finite): a value with a
    typical gradient moves `step` grid steps."""
    rms = grad.float().pow(2).mean().sqrt()
    if not torch.isfinite(rms) or rms == 0:
        return None
    return step * scale.float().clamp(min=0) / rms


@torch.no_grad()
def v_step(w_hat, grad, scale, zero, fmt: QuantFormat, eta, max_changes: int) -> torch.Tensor:
    """The V step: `w_hat` (out, in) on the grid of `scale` / `zero` moved to the minimiser of phi (module
    docstring) over the grid with at most `max_changes` values changed; eta: the proximal step, a float or
    one per block (eta = 1 / L for an L-smooth loss makes phi a majorizer: the step never raises the loss);
    returns the new w_hat."""
    blocks = w_hat.float().reshape(scale.numel(), -1)
    g = grad.float().reshape(blocks.shape)
    if max_changes <= 0 or eta is None:
        return w_hat
    eta = torch.as_tensor(eta, dtype=torch.float32).expand(scale.numel())[:, None].expand_as(blocks)
    target = blocks - eta * g
    # the nearest grid point to the target, at most one code from the current one (a trust region: an outlier
    # gradient would otherwise throw its value to the end of the grid in one step)
    n = w_hat.numel()
    current = unpack_bits(packed_with(w_hat, fmt, scale, zero).codes, fmt.bits, n).int()
    wanted = unpack_bits(packed_with(target.reshape(w_hat.shape), fmt, scale, zero).codes, fmt.bits, n).int()
    codes = pack_bits(torch.minimum(torch.maximum(wanted, current - 1), current + 1).to(torch.uint8), fmt.bits)
    stored = scale.float().clamp(min=0), None if zero is None else zero.float()
    candidate = with_scales(fmt, tuple(w_hat.shape), codes, *stored).dequantize(torch.float32)
    candidate = candidate.reshape(blocks.shape)
    # phi(candidate) - phi(w_hat) per value, <= 0 (the candidate is the grid point nearest the target)
    safe = torch.where(eta > 0, eta, torch.ones_like(eta))
    gain = torch.where(eta > 0, ((blocks - target) ** 2 - (candidate - target) ** 2) / (2 * safe), 0)
    gain = torch.where(candidate != blocks, gain, 0).flatten()
    k = min(max_changes, int((gain > 0).sum()))
    out = blocks.flatten().clone()
    if k:
        idx = torch.topk(gain, k).indices
        out[idx] = candidate.flatten()[idx]
    return out.view(w_hat.shape).to(w_hat.dtype)


@torch.no_grad()
def snap(weight: torch.Tensor, fmt: QuantFormat, old_scale, old_zero, scale, zero) -> None:
    """weight's codes (against old_scale / old_zero) dequantized with the new scale / zero, in place."""
    weight.copy_(recode(weight, fmt, old_scale, old_zero, scale, zero).dequantize(torch.float32).to(weight.dtype))


class PVTuning(Hooks):
    """The V step before each optimizer step (the optimizer then takes the P step), and the weights re-snapped
    to the scales it moved; modules: the PV linears (FakeQuantLinear with pv=True)."""

    def __init__(self, modules: list, step: float, fraction: float, peak_lr: float):
        self.modules, self.step, self.fraction, self.peak_lr = modules, step, fraction, peak_lr
        self.before: list = []

    def before_step(self, optimizer, step: int) -> None:
        self.before = []
        # the number of changed codes follows the lr schedule (warmup, decay), as the P step's size does
        lr = max(g["lr"] / g.get("lr_scale", 1.0) for g in optimizer.param_groups)
        fraction = self.fraction * min(lr / self.peak_lr, 1.0) if self.peak_lr > 0 else self.fraction
        for m in self.modules:
            w = m.weight
            scale, zero = m.qat_scale, m.qat_zero
            self.before.append((scale.detach().clone(), None if zero is None else zero.detach().clone()))
            if w.grad is None:
                continue
            k = math.ceil(fraction * w.numel())
            eta = normalized_eta(w.grad, scale.detach(), self.step)
            zero = None if zero is None else zero.detach()
            w.data.copy_(v_step(w.data, w.grad, scale.detach(), zero, m.spec.fmt, eta, k))
            w.grad = None  # the optimizer's zero_grad does not reach a parameter it does not hold

    def after_step(self, model, optimizer, step: int) -> None:
        for m, (old_scale, old_zero) in zip(self.modules, self.before):
            snap(m.weight.data, m.spec.fmt, old_scale, old_zero, m.qat_scale, m.qat_zero)
        self.before = []
