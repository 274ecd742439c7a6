"""Block-wise symmetric INT8: one fp32 absmax per block of `block_size` weights.

code = round(w / absmax * 127) in int8, w ~= code * absmax / 127; the error per weight is at most
absmax / 254 (half a step). 8 bits + 32/block_size bits per weight (8.5 at blocks of 64).
"""

from __future__ import annotations

import torch

from slimtune.quant.linear import QuantizedLinear


def quantize_int8(w: torch.Tensor, block_size: int = 64) -> dict[str, torch.Tensor]:
    """w: numel % block_size == 0 -> {'codes': int8 (numel,), 'absmax': fp32 (numel / block_size,)}."""
    if w.numel() % block_size:
        raise ValueError(f"INT8 needs numel divisible by block_size={block_size}; weight shape {tuple(w.shape)}")
    blocks = w.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(blocks / safe[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return {"codes": codes.flatten(), "absmax": absmax}


def dequantize_int8(t: dict[str, torch.Tensor], shape, block_size: int, dtype=torch.float32) -> torch.Tensor:
    blocks = t["codes"].view(-1, block_size).float() * (t["absmax"] / 127)[:, None]
    return blocks.to(dtype).view(shape)


class Int8Linear(QuantizedLinear):
    """Frozen block-wise INT8 linear. x: (..., in_features) -> (..., out_features)."""

    format = "int8"

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return quantize_int8(weight, self.block_size)

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(tensors, (self.out_features, self.in_features), self.block_size, dtype)
