"""Block-wise NF4 (QLoRA's 4-bit NormalFloat) in pure torch, so a quantized base runs anywhere.

Storage per weight: 4 bits (2 codes per byte, first element in the high nibble as bitsandbytes packs
it) + one absmax per block of `block_size` (fp32, or with double quantization an int8 per block
plus one fp32 scale per 256 blocks and a global offset: 32/64 -> ~8.1/64 bits per weight).

Dequantization is one table lookup per byte (a 256 x 2 table of codebook pairs) and one multiply per
block, done per forward and again in backward (see quant/linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtune.quant.linear import QuantizedLinear

# QLoRA / bitsandbytes NF4 code values (Dettmers et al. 2023, appendix E)
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
# byte -> (code of high nibble, code of low nibble) as values
_PAIR_LUT = torch.stack([NF4_CODEBOOK[torch.arange(256) >> 4], NF4_CODEBOOK[torch.arange(256) & 15]], dim=1)
DQ_BLOCK = 256  # blocks of absmax values per second-level scale (QLoRA's double quantization)


def _check(numel: int, shape, block_size: int) -> None:
    if block_size % 2 or block_size <= 0:
        raise ValueError(f"NF4 block_size must be a positive even number, got {block_size}")
    if numel % block_size:
        raise ValueError(f"NF4 needs numel divisible by block_size={block_size}; weight shape {tuple(shape)}")


def quantize_scales(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Double quantization: (absmax - mean) as int8, one fp32 scale per DQ_BLOCK values."""
    offset = absmax.mean()
    centered = absmax - offset
    pad = (-centered.numel()) % DQ_BLOCK
    blocks = F.pad(centered, (0, pad)).view(-1, DQ_BLOCK)
    scale = blocks.abs().amax(dim=1).clamp(min=1e-12)
    q = torch.round(blocks / scale[:, None] * 127).to(torch.int8)
    return {"absmax_q": q.flatten()[: absmax.numel()].contiguous(), "absmax_scale": scale, "absmax_offset": offset.reshape(1)}


def dequantize_scales(t: dict[str, torch.Tensor]) -> torch.Tensor:
    q = t["absmax_q"]
    pad = (-q.numel()) % DQ_BLOCK
    blocks = F.pad(q.float(), (0, pad)).view(-1, DQ_BLOCK)
    return ((blocks / 127) * t["absmax_scale"][:, None]).flatten()[: q.numel()] + t["absmax_offset"]


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """w: any shape, numel % block_size == 0 -> {'codes': uint8 (numel/2,), 'absmax' or its int8 form}."""
    _check(w.numel(), w.shape, block_size)
    blocks = w.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = torch.bucketize(scaled, _MIDPOINTS.to(w.device)).to(torch.uint8).flatten()
    packed = (codes[0::2] << 4) | codes[1::2]
    out = {"codes": packed}
    out.update(quantize_scales(absmax) if double_quant else {"absmax": absmax})
    return out


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (n/2,) -> uint8 codes (n,) in order."""
    return torch.stack([packed >> 4, packed & 15], dim=1).flatten()


def dequantize_nf4(t: dict[str, torch.Tensor], shape, block_size: int, dtype=torch.float32) -> torch.Tensor:
    absmax = t["absmax"] if "absmax" in t else dequantize_scales(t)
    vals = F.embedding(t["codes"].long(), _PAIR_LUT.to(t["codes"].device))  # (n/2, 2) fp32
    return (vals.view(-1, block_size) * absmax[:, None]).to(dtype).view(shape)


class NF4Linear(QuantizedLinear):
    """Frozen NF4 linear (QLoRA's base layer). x: (..., in_features) -> (..., out_features)."""

    format = "nf4"

    def __init__(self, in_features, out_features, bias=None, block_size=64, double_quant=True, compute_dtype=None):
        if block_size % 2:
            raise ValueError(f"NF4 block_size must be even (2 codes per byte), got {block_size}")
        super().__init__(in_features, out_features, bias, block_size, compute_dtype)
        self.double_quant = double_quant

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return quantize_nf4(weight, self.block_size, self.double_quant)

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(tensors, (self.out_features, self.in_features), self.block_size, dtype)
