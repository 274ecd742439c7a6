"""The frozen quantized linear shared by every slimtune format (nf4.py, int8.py).

A format subclass stores its packed tensors as buffers (so `.to()`, `state_dict()` and safetensors
work) and implements `quantize(weight) -> dict` and `dequantize(dict, dtype) -> (out, in)` tensor.
`LinearDequant` dequantizes in forward and again in backward instead of saving W: the full-precision
weight exists only for the duration of one matmul, which is where QLoRA's memory saving comes from.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearDequant(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; W and b get no gradient."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        return F.linear(x, module.dequantize_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.module.dequantize_weight(grad_out.dtype)
        return grad_out @ w, None, None


class QuantizedLinear(nn.Module):
    format = "?"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None,
                 block_size: int = 64, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.compute_dtype = block_size, compute_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    # -- format hooks
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # -- shared behaviour
    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, **fmt_kwargs) -> "QuantizedLinear":
        bias = linear.bias.detach().to(compute_dtype or linear.bias.dtype) if linear.bias is not None else None
        m = cls(linear.in_features, linear.out_features, bias, compute_dtype=compute_dtype, **fmt_kwargs)
        m.requantize_(linear.weight)
        return m.to(linear.weight.device)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored codes by quantizing `weight` (out, in), e.g. after merging a LoRA delta."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        for name in list(self._buffers):
            del self._buffers[name]
        for name, t in self.quantize(weight).items():
            self.register_buffer(name, t)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize(self.packed_tensors(), dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight incl. scales (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self.packed_tensors().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else (self.compute_dtype or x.dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        y = LinearDequant.apply(x.to(dtype), self, bias)
        return y if autocast else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"block_size={self.block_size}")
