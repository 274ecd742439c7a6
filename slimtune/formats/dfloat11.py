"""DFloat11: lossless compression of bf16 tensors (Zhang et al. 2025, "70% Size, 100% Accuracy").

A bf16 value is sign (1 bit) | exponent (8) | mantissa (7). Sign and mantissa are close to uniformly
random and are kept raw, one byte per value (sign << 7 | mantissa, the byte layout of the DFloat11
package). The exponent of trained weights carries only ~2.6 bits of entropy, so it is Huffman-coded:

  * one code table per tensor, stored as 256 code lengths only (0 = symbol absent); the canonical code
    (shorter codes first, then by symbol) is rebuilt from the lengths on both sides;
  * code lengths are capped at 32 bits (a decoder reads a 32-bit window) by the package-merge algorithm
    (Larmore & Hirschberg), which gives the optimal length-limited prefix code: equal to Huffman when
    Huffman already fits in 32 bits, optimal under the cap when it does not (Fibonacci-like counts);
  * the codes are concatenated MSB-first into `bitstream`; every `block_values` values start a block,
    and `block_offsets[b]` is the bit where block b starts (block_offsets[-1] = total bits), so blocks
    decode independently: the torch decoder runs all blocks in lockstep, one symbol per iteration, and
    the Triton decoder (slimtune.kernels.dfloat11_decode) gives each block a lane.

fp32 tensors use the same idea (`encode_fp32`): fp32 has the same 8-bit exponent, so sign + 23 mantissa
bits stay raw (3 bytes) and the exponent is coded the same way: ~26.7 bits/value instead of 32 on
trained-weight-like tensors (a ~16% saving).

Decoding validates what it reads: malformed parts, a truncated bitstream, offsets that do not match
where a block's codes end, or a bit pattern that is no code raise ValueError. (This is not a checksum:
a flipped bit that still parses as codes of the right total length decodes to other values.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from slimtune.kernels.dfloat11_decode import (  # noqa: F401  (the decoding side: kernel + torch reference)
    FAST_BITS,
    MAX_CODE_LENGTH,
    _check_lengths,
    canonical_codes,
    check_block_ends,
    check_parts,
    decode,
    decode_fp32,
    decode_tables,
    dfloat11_decode,
    fast_table,
)

BLOCK_VALUES = 4096  # values per independently decodable block: 64 offset bits / 4096 = 0.016 bits/value
_ENCODE_CHUNK = 1 << 20  # values packed per numpy pass (bounds the encoder's uint64 temporaries)
_MASK32 = (1 << 32) - 1


# ---------------------------------------------------------------- code tables


def code_lengths(freqs: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths (uint8, same size as freqs) with every length <= max_length.

    Package-merge: each level's list is the leaves plus the pairwise packages of the previous level's
    list, sorted by weight; a symbol's length is how many of the first 2m - 2 items of the last list
    contain it. Items are rows of a (items, m) count matrix, so each level is a few numpy ops."""
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(len(freqs), dtype=np.uint8)
    present = np.flatnonzero(freqs)
    m = len(present)
    if m == 0:
        return lengths
    if m == 1:  # a code needs at least one bit
        lengths[present] = 1
        return lengths
    if m > 1 << max_length:
        raise ValueError(f"{m} symbols do not fit in codes of at most {max_length} bits")
    order = present[np.argsort(freqs[present], kind="stable")]
    leaf_weight, leaf_count = freqs[order], np.eye(m, dtype=np.int32)
    weight, count = leaf_weight, leaf_count
    for _ in range(max_length - 1):
        pairs = len(weight) // 2 * 2
        weight = np.concatenate([leaf_weight, weight[0:pairs:2] + weight[1:pairs:2]])
        count = np.concatenate([leaf_count, count[0:pairs:2] + count[1:pairs:2]])
        by_weight = np.argsort(weight, kind="stable")
        weight, count = weight[by_weight], count[by_weight]
    lengths[order] = count[: 2 * m - 2].sum(axis=0)
    return lengths


def _pack_codes(codes: np.ndarray, lengths: np.ndarray, starts: np.ndarray, words: np.ndarray) -> None:
    """OR codes (uint64, MSB-first, `lengths` bits each) starting at bit `starts` into `words` (uint64).

    Codes never overlap, so summing the parts that land in one word equals OR-ing them; starts are
    increasing, so each word's parts are one reduceat segment. A code (<= 32 bits) spills over at most
    one word boundary, and at most one code crosses each boundary."""
    word, offset = starts >> 6, starts & 63
    shift = 64 - offset.astype(np.int64) - lengths
    head = np.where(
        shift >= 0, codes << np.maximum(shift, 0).astype(np.uint64), codes >> np.maximum(-shift, 0).astype(np.uint64)
    )
    segment = np.concatenate([[0], np.flatnonzero(word[1:] != word[:-1]) + 1])
    words[word[segment]] |= np.add.reduceat(head, segment)
    spill = np.flatnonzero(shift < 0)
    words[word[spill] + 1] |= codes[spill] << (64 + shift[spill]).astype(np.uint64)


def _encode_exponents(exponent: np.ndarray, block_values: int) -> dict:
    """The coded part of the format for `exponent` (uint8 (n,)): bitstream, block_offsets, code_lengths."""
    if not isinstance(block_values, int) or block_values < 1:
        raise ValueError(f"block_values must be a positive int, got {block_values!r}")
    lengths = code_lengths(np.bincount(exponent, minlength=256))
    codes, bit_lengths = canonical_codes(lengths), lengths.astype(np.uint64)
    n = len(exponent)
    value_lengths = bit_lengths[exponent]
    ends = np.cumsum(value_lengths, dtype=np.uint64)
    total_bits = int(ends[-1]) if n else 0
    words = np.zeros(-(-total_bits // 64), dtype=np.uint64)
    for lo in range(0, n, _ENCODE_CHUNK):
        hi = min(n, lo + _ENCODE_CHUNK)
        chunk = exponent[lo:hi]
        _pack_codes(codes[chunk], bit_lengths[chunk], ends[lo:hi] - value_lengths[lo:hi], words)
    bitstream = words.astype(">u8").view(np.uint8)[: -(-total_bits // 8)]
    block_ends = ends[block_values - 1 :: block_values].astype(np.int64).tolist()
    if n % block_values:  # a partial last block
        block_ends.append(total_bits)
    block_offsets = torch.tensor([0] + block_ends, dtype=torch.int64)
    return {
        "bitstream": torch.from_numpy(bitstream.copy()),
        "block_offsets": block_offsets,
        "code_lengths": torch.from_numpy(lengths),
        "block_values": block_values,
    }


def encode(t: torch.Tensor, block_values: int = BLOCK_VALUES) -> dict[str, torch.Tensor | int | list]:
    """Encode a bf16 tensor losslessly: sign_mantissa uint8 (n,), bitstream uint8, block_offsets int64
    (n_blocks + 1,) in bits, code_lengths uint8 (256,), block_values int, shape list."""
    if t.dtype != torch.bfloat16:
        raise ValueError(f"dfloat11.encode needs a bfloat16 tensor, got {t.dtype} (fp32: encode_fp32)")
    bits = t.detach().cpu().contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)
    exponent = ((bits >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    return {
        "sign_mantissa": torch.from_numpy(sign_mantissa),
        **_encode_exponents(exponent, block_values),
        "shape": list(t.shape),
    }


def encode_fp32(t: torch.Tensor, block_values: int = BLOCK_VALUES) -> dict[str, torch.Tensor | int | list]:
    """encode() for fp32: sign_mantissa is uint8 (n, 3), big-endian sign << 23 | mantissa."""
    if t.dtype != torch.float32:
        raise ValueError(f"dfloat11.encode_fp32 needs a float32 tensor, got {t.dtype}")
    bits = t.detach().cpu().contiguous().view(torch.int32).numpy().reshape(-1).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint8)
    raw = ((bits >> 8) & 0x800000) | (bits & 0x7FFFFF)
    sign_mantissa = np.stack([(raw >> 16) & 0xFF, (raw >> 8) & 0xFF, raw & 0xFF], axis=1).astype(np.uint8)
    return {
        "sign_mantissa": torch.from_numpy(sign_mantissa),
        **_encode_exponents(exponent, block_values),
        "shape": list(t.shape),
    }


# ---------------------------------------------------------------- decoding


def bits_per_value(parts: dict) -> float:
    """Stored bits per value: raw sign/mantissa, bitstream, block offsets and code table (0.0 if empty)."""
    n = math.prod(parts["shape"])
    if n == 0:
        return 0.0
    total = sum(
        parts[name].numel() * parts[name].element_size() * 8
        for name in ("sign_mantissa", "bitstream", "block_offsets", "code_lengths")
    )
    return total / n
