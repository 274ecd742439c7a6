"""Double quantization (QLoRA) of a per-block fp32 vector: NF4's absmax, the packed formats' scale and zero.

The vector v (nb,) is centred on its mean, then quantized symmetrically to int8 in blocks of DQ_BLOCK
values with one fp32 scale (the block's max |v - mean|) each. Centring first spends the 8 bits on the
spread of the values, not on their (large) mean. Storage: nb int8 + 4 * (ceil(nb / 256) + 1) bytes, and
each value comes back within half an int8 step, max|v - mean| / 254 of its 256-block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DQ_BLOCK = 256  # values per second-level fp32 scale (QLoRA's double quantization)


def double_quant_sizes(n: int, prefix: str) -> dict[str, int]:
    """Element counts of double_quantize's tensors for a vector of n values: {prefix_q, _scale, _offset}."""
    return {f"{prefix}_q": n, f"{prefix}_scale": -(-n // DQ_BLOCK), f"{prefix}_offset": 1}


def double_quant_nbytes(n: int) -> int:
    """Storage in bytes of a double-quantized vector of n values (int8 codes + fp32 scales + fp32 mean)."""
    return n + 4 * (-(-n // DQ_BLOCK) + 1)


@torch.no_grad()
def double_quantize(values: torch.Tensor, prefix: str = "absmax") -> dict[str, torch.Tensor]:
    """fp32 (nb,) -> {prefix_q: int8 (nb,), prefix_scale: fp32 (ceil(nb/256),), prefix_offset: fp32 (1,)}."""
    values = values.float()
    offset = values.mean().reshape(1)
    centered = values - offset
    pad = (-centered.numel()) % DQ_BLOCK
    blocks = F.pad(centered, (0, pad)).view(-1, DQ_BLOCK)
    scale = blocks.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return {
        f"{prefix}_q": q.flatten()[: values.numel()].contiguous(),
        f"{prefix}_scale": scale,
        f"{prefix}_offset": offset,
    }


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """int8 (nb,), fp32 (ceil(nb/256),), fp32 (1,) -> fp32 (nb,) (inverse of double_quantize, up to rounding)."""
    qf = q.float()
    pad = (-qf.numel()) % DQ_BLOCK
    blocks = F.pad(qf, (0, pad)).view(-1, DQ_BLOCK) * (scale.float() / 127)[:, None]
    return blocks.flatten()[: qf.numel()] + offset.float()
