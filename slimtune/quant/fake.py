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

from slimtune.quant.activations import fake_quantize_activations
from slimtune.quant.learned_scales import initial_scales, learned_fake_quantize, packed_with, stored
from slimtune.quant.linear import configured_format
from slimtune.quant.packed import with_scales
from slimtune.quant.pv_tuning import codes_fixed_quantize
from slimtune.registry import QUANT_FORMATS


class QuantFormatSpec:
    """A frozen format by quant.method (and block size, double quant) with its quantize -> dequantize."""

    def __init__(self, method: str, block_size: int = 64, double_quant: bool = True, options=None):
        self.method, self.block_size, self.double_quant = method, block_size, double_quant
        self.cls = QUANT_FORMATS.get(method)
        self.fmt = configured_format(self.cls, method, block_size, double_quant, options)

    @classmethod
    def of_module(cls, module) -> "QuantFormatSpec":
        """The spec of a frozen quantized linear's own format (LQ-LoRA's per-matrix NF-k, say)."""
        spec = cls.__new__(cls)
        spec.cls, spec.fmt = type(module), module.fmt
        spec.method, spec.block_size, spec.double_quant = (
            module.fmt.name,
            module.fmt.block_size,
            module.fmt.double_quant,
        )
        return spec

    @torch.no_grad()
    def packed(self, w: torch.Tensor):
        """quantize(w): the format's packed-weight holder of (out, in) `w`, by its own code path (an empty module
        of w's shape)."""
        out_features, in_features = w.shape
        module = self.cls.make(self.fmt, in_features, out_features, False, None, w.device)
        return module.quantize_weight(w.detach())

    def round_trip(self, w: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(w)) in w's dtype."""
        return self.packed(w).dequantize(torch.float32).to(w.dtype)


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
    """nn.Linear computing with its weight fake-quantized to `spec` (the bias is not quantized).

    enabled: False computes with the weight as it is (qat.start_step). activations: "int8" also fake-quantizes
    the input per token. delta: a callable giving an (out, in) fp32 update added before quantizing (a LoRA
    adapter wrapped around this module, so the adapter trains against the quantization its merge gets)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantFormatSpec, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.spec, self.enabled, self.activations = spec, True, "none"
        self.__dict__["delta"] = None
        self.qat_scale = self.qat_zero = None
        self.pv = False

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: QuantFormatSpec,
        activations: str = "none",
        delta=None,
        learn_scales: bool = False,
        pv: bool = False,
    ) -> "FakeQuantLinear":
        """The same parameters (shared, not copied), now trained against the format. learn_scales: the block
        scales (and asymmetric zeros) become parameters `qat_scale` / `qat_zero` (quant/learned_scales.py). pv:
        PV-Tuning (quant/pv_tuning.py): learned scales and packed codes `qat_codes` (round to nearest to start),
        the weight staying the continuous buffer the V step rounds towards."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features, m.spec = linear.in_features, linear.out_features, spec
        m.weight, m.bias = linear.weight, linear.bias
        m.enabled, m.activations = True, activations
        m.__dict__["delta"] = delta  # not a submodule: the adapter owns this module, not the reverse
        m.qat_scale = m.qat_zero = None
        m.pv = pv
        if learn_scales or pv:
            scale, zero = initial_scales(m.effective_weight().detach(), spec.fmt)
            m.qat_scale = nn.Parameter(scale)
            m.qat_zero = nn.Parameter(zero) if zero is not None else None
        if pv:  # updated by the V step only; a `discrete` parameter is saved with checkpoints, never optimized
            codes = packed_with(m.weight.detach(), spec.fmt, m.qat_scale, m.qat_zero).codes
            m.qat_codes = nn.Parameter(codes, requires_grad=False)
            m.qat_codes.discrete = True
        return m

    def quantized_weight(self) -> torch.Tensor:
        """The effective weight fake-quantized (learned scales when it has them; PV: codes fixed)."""
        w = self.effective_weight()
        if self.pv:
            return codes_fixed_quantize(w, self.qat_scale, self.qat_zero, self.qat_codes, self.spec.fmt)
        if self.qat_scale is not None:
            return learned_fake_quantize(w, self.qat_scale, self.qat_zero, self.spec.fmt)
        return fake_quantize(w, self.spec)

    @torch.no_grad()
    def packed(self):
        """What the converted linear stores: the format's packed weight of the effective weight."""
        w = self.effective_weight().detach()
        if self.pv:  # the codes the V step chose, with the scales the P step trained
            scales = stored(self.qat_scale, self.qat_zero)
            return with_scales(self.spec.fmt, tuple(w.shape), self.qat_codes.detach(), *scales)
        if self.qat_scale is not None:
            return packed_with(w, self.spec.fmt, self.qat_scale, self.qat_zero)
        return self.spec.packed(w)

    def effective_weight(self) -> torch.Tensor:
        """The weight that is quantized: the weight, plus the adapter's update (fp32) when there is one."""
        return self.weight if self.delta is None else self.weight.float() + self.delta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            w = self.quantized_weight()
            if self.activations == "int8":
                x = fake_quantize_activations(x)
        else:
            w = self.effective_weight()
        return F.linear(x, w.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        extra = f", activations={self.activations}" if self.activations != "none" else ""
        return f"{super().extra_repr()}, fake_quant={self.spec.fmt.name}{extra}, enabled={self.enabled}"
