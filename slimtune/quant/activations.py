"""Dynamic per-token int8 fake quantization of a linear layer's input (torchao's 8da4w activations), shared by
QAT's FakeQuantLinear and the quantized linears a QAT run with qat.activations=int8 converts to."""

from __future__ import annotations

import torch


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token asymmetric int8 (torchao's 8da4w activations): each row of x's last dimension gets
    scale = (max(x, 0) - min(x, 0)) / 255 and the zero point torchao's choose_qparams_per_token_asymmetric
    picks; x -> (clamp(round(x / scale) + zp, -128, 127) - zp) * scale, computed in fp32, gradient straight
    through."""
    return _ActivationsStraightThrough.apply(x)


@torch.no_grad()
def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    qmin, qmax = -128, 127
    v = x.float()
    lo = v.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = v.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    low, high = lo / scale, hi / scale
    zp = torch.where(qmin + low + qmax + high > 0, qmin - low, qmax - high).clamp(qmin, qmax).round()
    q = torch.round(v / scale).add_(zp).clamp_(qmin, qmax)
    return q.sub_(zp).mul_(scale).to(x.dtype)


class _ActivationsStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _per_token_int8(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad
