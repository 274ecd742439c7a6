"""Block-wise INT-k (k = 2..8) codes, symmetric or asymmetric, as unsigned k-bit integers.

Symmetric: qmax = 2**(k-1) - 1, scale = absmax / qmax, code = round(v / scale) + qmax in 0..2*qmax, so
the grid (code - qmax) * scale has 2**k - 1 levels, symmetric about 0 with 0 exact (code 2**k - 1 is
unused). An all-zero block has scale 0 and every code qmax.

Asymmetric: zero = block min, scale = (max - min) / (2**k - 1), code = round((v - zero) / scale) in
0..2**k-1, and v ~= zero + code * scale: all 2**k levels span [min, max]. A constant block has scale 0
and is exact. Either way each value is within scale / 2 (half a grid step) of its original.
"""

from __future__ import annotations

import torch

INT_BITS = range(2, 9)


def _check_bits(bits: int) -> None:
    if bits not in INT_BITS:
        raise ValueError(f"INT bits must be in {INT_BITS.start}..{INT_BITS.stop - 1}, got {bits!r}")


def int_qmax(bits: int, symmetric: bool) -> int:
    """Largest code magnitude: 2**(bits-1) - 1 (symmetric, signed levels) or 2**bits - 1 (asymmetric)."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int_blocks(
    blocks: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """blocks fp32 (nb, B), finite -> (codes uint8 (nb * B,), scale fp32 (nb,), zero fp32 (nb,) or None).
    scale (and zero, asymmetric): the grid to code against (QAT's learned one) instead of the blocks' own."""
    qmax = int_qmax(bits, symmetric)
    if symmetric:
        scale = blocks.abs().amax(dim=1) / qmax if scale is None else scale
        q = torch.round(blocks / _safe(scale)[:, None]).clamp_(-qmax, qmax).add_(qmax)
        return q.to(torch.uint8).flatten(), scale, None
    if scale is None:
        zero = blocks.amin(dim=1)
        scale = (blocks.amax(dim=1) - zero) / qmax
    q = torch.round((blocks - zero[:, None]) / _safe(scale)[:, None]).clamp_(0, qmax)
    return q.to(torch.uint8).flatten(), scale, zero


def dequantize_int_blocks(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool = True
) -> torch.Tensor:
    """codes uint8 (nb * B,), scale fp32 (nb,), zero fp32 (nb,) or None -> fp32 (nb, B)."""
    values = codes.view(scale.numel(), -1).float()
    if symmetric:
        return values.sub_(int_qmax(bits, True)).mul_(scale.float()[:, None])
    return values.mul_(scale.float()[:, None]).add_(zero.float()[:, None])
