"""Fake quantization for quantization-aware training: a weight rounded to a frozen format in forward, with a
straight-through gradient in backward.

    fake_quantize(w, method, block_size, double_quant) = dequantize(quantize(w))      (forward)
    d fake_quantize / d w = identity                                                  (backward, STE)

The forward goes through the format's own quantize and dequantize (its QUANT_FORMATS class), so the
fake-quantized weight is bit for bit what `slimtune quantize` / a quantized base stores and decodes: a model
trained against it converts with no rounding error left. `FakeQuantLinear` is an nn.Linear whose forward
uses its fake-quantized weight (the weight itself stays the full-precision master, trained as usual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.quant.linear import configured_format
from slimtune.registry import QUANT_FORMATS


class QuantFormatSpec:
    """A frozen format by quant.method (and block size, double quant) with its quantize -> dequantize."""

    def __init__(self, method: str, block_size: int = 64, double_quant: bool = True, options=None):
        self.method, self.block_size, self.double_quant = method, block_size, double_quant
        self.cls = QUANT_FORMATS.get(method)
        self.fmt = configured_format(self.cls, method, block_size, double_quant, options)

    @torch.no_grad()
    def round_trip(self, w: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(w)) in w's dtype: the format's own code path (an empty module of w's shape)."""
        out_features, in_features = w.shape
        module = self.cls.make(self.fmt, in_features, out_features, False, None, w.device)
        return module.quantize_weight(w.detach()).dequantize(torch.float32).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, spec: QuantFormatSpec) -> torch.Tensor:
        return spec.round_trip(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantize(w: torch.Tensor, spec: QuantFormatSpec) -> torch.Tensor:
    """`w` (out, in) rounded to `spec`'s format in forward; the gradient passes straight through."""
    return _StraightThrough.apply(w, spec)


class FakeQuantLinear(nn.Linear):
    """nn.Linear computing with its weight fake-quantized to `spec` (the bias is not quantized)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantFormatSpec, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.spec = spec

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantFormatSpec) -> "FakeQuantLinear":
        """The same parameters (shared, not copied), now trained against the format."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features, m.spec = linear.in_features, linear.out_features, spec
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.spec).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fake_quant={self.spec.fmt.name}"
