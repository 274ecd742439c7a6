"""NormalFloat-k (QLoRA's NF4 construction generalised to k bits): codebook and block-wise codes.

The 2**k code values are quantiles of N(0, 1) scaled to [-1, 1], asymmetric so that 0 is exact: with
n = 2**k and offset = 1 - (1/(2(n-1)) + 1/(2n)) / 2 (0.9677083 for k = 4),
  positives = ndtri(linspace(offset, 0.5, n/2 + 1)[:-1])    (n/2 values)
  negatives = -ndtri(linspace(offset, 0.5, n/2)[:-1])      (n/2 - 1 values)
plus 0, sorted and divided by the largest. This is bitsandbytes' create_normal_map, whose offset is the
constant 0.9677083, i.e. the formula rounded to 7 decimals; rounding the same way, and taking the
linspace in fp32 like bnb, makes nf_codebook(4) bit-identical to NF4_CODEBOOK (ndtri runs in fp64).

A block of values v is stored as its absmax (fp32) and, per value, the index of the code nearest to
v / absmax (ties to the lower code, as NF4 and bitsandbytes).
"""

from __future__ import annotations

import torch

NF_BITS = range(2, 9)  # 2..4 are the useful ones; up to 8 is allowed

_CODEBOOKS: dict[tuple[int, torch.device], torch.Tensor] = {}  # (bits, device) -> codebook (no copy per call)


def _check_bits(bits: int) -> None:
    if bits not in NF_BITS:
        raise ValueError(f"NF bits must be in {NF_BITS.start}..{NF_BITS.stop - 1}, got {bits!r}")


def _build_codebook(bits: int) -> torch.Tensor:
    n = 2**bits
    offset = round(1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n)), 7)
    positives = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1).double())[:-1]
    negatives = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2).double())[:-1]
    values = torch.cat([positives, negatives, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return values / values.max()


def nf_codebook(bits: int, device=None) -> torch.Tensor:
    """fp32 (2**bits,) ascending NF-k code values in [-1, 1], with -1, 0 and 1 exact. Cached; do not modify."""
    _check_bits(bits)
    device = torch.device(device or "cpu")
    if (bits, device) not in _CODEBOOKS:
        cpu = _CODEBOOKS.get((bits, torch.device("cpu")))
        _CODEBOOKS[(bits, device)] = (_build_codebook(bits) if cpu is None else cpu).to(device)
    return _CODEBOOKS[(bits, device)]


def quantize_nf_blocks(
    blocks: torch.Tensor, bits: int, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks fp32 (nb, B), finite -> (codes uint8 (nb * B,) in 0..2**bits-1, absmax fp32 (nb,)). absmax: the
    block scales to code against (QAT's learned ones) instead of the blocks' own absmax."""
    codebook = nf_codebook(bits, blocks.device)
    absmax = blocks.abs().amax(dim=1) if absmax is None else absmax
    # all-zero blocks: divide by 1 instead of 0; every value then maps to the code of 0.0
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    # nearest value == bucketize against the midpoints between neighbouring code values
    codes = torch.bucketize(scaled, (codebook[1:] + codebook[:-1]) / 2).to(torch.uint8)
    return codes.flatten(), absmax


def dequantize_nf_blocks(codes: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 (nb * B,), absmax fp32 (nb,) -> fp32 (nb, B) = codebook[codes] * absmax."""
    # int32 indices (not int64) keep the transient small; a 1-D index_select is faster than embedding's rows
    values = torch.index_select(nf_codebook(bits, codes.device), 0, codes.view(-1).int()).view(absmax.numel(), -1)
    return values.mul_(absmax.float()[:, None])
