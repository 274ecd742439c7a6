"""Dense bit packing of k-bit codes (k = 1..8) into a uint8 bitstream.

Layout: the codes form one MSB-first bitstream, code 0 in the highest bits of byte 0, then code 1, and
so on across byte boundaries; only the last byte can be padded (with zero bits). For k = 4 this is
nf4.pack_codes' layout (first value in the high nibble, bitsandbytes' order).

Vectorised by groups: lcm(k, 8) bits hold exactly lcm(k, 8)/k codes and lcm(k, 8)/8 whole bytes, so each
group is combined into one integer word and split again. The word is at most 56 bits (k = 7); words up
to 24 bits (k in 1, 2, 3, 4, 6) use int32, which keeps the transient at 4 bytes per code.
"""

from __future__ import annotations

import math

import torch


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def packed_len(n: int, bits: int) -> int:
    """Bytes needed for n codes of `bits` bits: ceil(n * bits / 8)."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def _group(bits: int) -> tuple[int, int, torch.dtype]:
    """(codes per group, bytes per group, word dtype) for a group of lcm(bits, 8) bits."""
    word_bits = math.lcm(bits, 8)
    return word_bits // bits, word_bits // 8, torch.int32 if word_bits <= 24 else torch.int64


def _shifts(count: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(count,) left shifts putting item 0 in the highest `width` bits of a count*width-bit word."""
    return torch.arange(count - 1, -1, -1, dtype=dtype, device=device) * width


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 (n,) with values < 2**bits, bits in 1..8 -> uint8 (ceil(n * bits / 8),) bitstream."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"pack_bits expects a 1-D uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    n = codes.numel()
    if n and int(codes.max()) >= 2**bits:
        raise ValueError(f"pack_bits: code {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.clone()
    per_group, nbytes, dt = _group(bits)
    pad = (-n) % per_group  # zero codes -> zero padding bits, all after the last real code
    groups = torch.cat([codes, codes.new_zeros(pad)]).view(-1, per_group).to(dt)
    words = (groups << _shifts(per_group, bits, dt, codes.device)).sum(dim=1, dtype=dt)  # (g,)
    out = (words[:, None] >> _shifts(nbytes, 8, dt, codes.device)) & 255  # (g, nbytes), MSB first
    return out.to(torch.uint8).flatten()[: packed_len(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 (ceil(n * bits / 8),) bitstream -> uint8 codes (n,) in 0..2**bits-1 (inverse of pack_bits)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() != packed_len(n, bits):
        raise ValueError(
            f"unpack_bits: expected {packed_len(n, bits)} uint8 bytes for {n} codes of {bits} bits, "
            f"got {packed.dtype} with {packed.numel()} elements"
        )
    packed = packed.reshape(-1)
    if bits == 8:
        return packed.clone()
    per_group, nbytes, dt = _group(bits)
    pad = (-packed.numel()) % nbytes
    groups = torch.cat([packed, packed.new_zeros(pad)]).view(-1, nbytes).to(dt)
    words = (groups << _shifts(nbytes, 8, dt, packed.device)).sum(dim=1, dtype=dt)  # (g,)
    codes = (words[:, None] >> _shifts(per_group, bits, dt, packed.device)) & (2**bits - 1)
    return codes.to(torch.uint8).flatten()[:n]
