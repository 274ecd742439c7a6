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

import contextlib
import math

import numpy as np
import torch

MAX_CODE_LENGTH = 32  # the decoders read one 32-bit window per symbol
BLOCK_VALUES = 4096  # values per independently decodable block: 64 offset bits / 4096 = 0.016 bits/value
_ENCODE_CHUNK = 1 << 20  # values packed per numpy pass (bounds the encoder's uint64 temporaries)
_WINDOW_BYTES = 5  # a 32-bit window starting at any bit lies within 5 bytes
_MASK32 = (1 << 32) - 1
FAST_BITS = 16  # the torch decoder's lookup table covers codes of up to 16 bits (65536 entries)


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


def _check_lengths(lengths: np.ndarray) -> None:
    """ValueError unless `lengths` (256,) are lengths <= 32 of a prefix code (Kraft sum <= 1)."""
    if lengths.shape != (256,):
        raise ValueError(f"code_lengths must have 256 entries, got shape {lengths.shape}")
    if lengths.max(initial=0) > MAX_CODE_LENGTH:
        raise ValueError(f"code_lengths has a length {int(lengths.max())} > {MAX_CODE_LENGTH}")
    kraft = sum(1 << (MAX_CODE_LENGTH - int(n)) for n in lengths if n)
    if kraft > 1 << MAX_CODE_LENGTH:
        raise ValueError("code_lengths do not form a prefix code (Kraft sum > 1)")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """(256,) uint64 canonical codes for `lengths`: by (length, symbol), each code = previous + 1,
    shifted left when the length grows."""
    codes = np.zeros(256, dtype=np.uint64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol], previous = code, int(lengths[symbol])
        code += 1
    return codes


def decode_tables(lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical-decode tables (all int64): limits (32,), base (32,), symbols (n_symbols,).

    For a 32-bit window x, li = #{limits <= x} (0..32) gives the code length li + 1, and the symbol is
    symbols[base[li] + (x >> (31 - li))]; li == 32 means x starts no code (an incomplete code)."""
    counts = np.bincount(lengths, minlength=MAX_CODE_LENGTH + 1)[1:].tolist()
    limits, base = [], []
    first, offset = 0, 0  # first code of the current length, symbols of shorter lengths
    for length, count in enumerate(counts, start=1):
        limits.append((first + count) << (MAX_CODE_LENGTH - length))
        base.append(offset - first)
        first, offset = (first + count) << 1, offset + count
    symbols = sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s))
    return (torch.tensor(limits, dtype=torch.int64), torch.tensor(base, dtype=torch.int64),
            torch.tensor(symbols, dtype=torch.int64))


def fast_table(lengths: np.ndarray) -> torch.Tensor:
    """(2**FAST_BITS,) int64 lookup on a window's top FAST_BITS bits: length << 8 | symbol of the code
    they start, or 0 when that code is longer (or there is none). Canonical codes taken in order fill
    the table from 0 upwards, each over 2**(FAST_BITS - length) entries."""
    short = [s for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)) if lengths[s] <= FAST_BITS]
    entries = np.repeat(np.array([int(lengths[s]) << 8 | int(s) for s in short], dtype=np.int64),
                        [1 << (FAST_BITS - int(lengths[s])) for s in short])
    table = np.zeros(1 << FAST_BITS, dtype=np.int64)
    table[: len(entries)] = entries
    return torch.from_numpy(table)


# ---------------------------------------------------------------- encoding


def _pack_codes(codes: np.ndarray, lengths: np.ndarray, starts: np.ndarray, words: np.ndarray) -> None:
    """OR codes (uint64, MSB-first, `lengths` bits each) starting at bit `starts` into `words` (uint64).

    Codes never overlap, so summing the parts that land in one word equals OR-ing them; starts are
    increasing, so each word's parts are one reduceat segment. A code (<= 32 bits) spills over at most
    one word boundary, and at most one code crosses each boundary."""
    word, offset = starts >> 6, starts & 63
    shift = 64 - offset.astype(np.int64) - lengths
    head = np.where(shift >= 0, codes << np.maximum(shift, 0).astype(np.uint64),
                    codes >> np.maximum(-shift, 0).astype(np.uint64))
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
    return {"bitstream": torch.from_numpy(bitstream.copy()), "block_offsets": block_offsets,
            "code_lengths": torch.from_numpy(lengths), "block_values": block_values}


def encode(t: torch.Tensor, block_values: int = BLOCK_VALUES) -> dict[str, torch.Tensor | int | list]:
    """Encode a bf16 tensor losslessly: sign_mantissa uint8 (n,), bitstream uint8, block_offsets int64
    (n_blocks + 1,) in bits, code_lengths uint8 (256,), block_values int, shape list."""
    if t.dtype != torch.bfloat16:
        raise ValueError(f"dfloat11.encode needs a bfloat16 tensor, got {t.dtype} (fp32: encode_fp32)")
    bits = t.detach().cpu().contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)
    exponent = ((bits >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    return {"sign_mantissa": torch.from_numpy(sign_mantissa), **_encode_exponents(exponent, block_values),
            "shape": list(t.shape)}


def encode_fp32(t: torch.Tensor, block_values: int = BLOCK_VALUES) -> dict[str, torch.Tensor | int | list]:
    """encode() for fp32: sign_mantissa is uint8 (n, 3), big-endian sign << 23 | mantissa."""
    if t.dtype != torch.float32:
        raise ValueError(f"dfloat11.encode_fp32 needs a float32 tensor, got {t.dtype}")
    bits = t.detach().cpu().contiguous().view(torch.int32).numpy().reshape(-1).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint8)
    raw = ((bits >> 8) & 0x800000) | (bits & 0x7FFFFF)
    sign_mantissa = np.stack([(raw >> 16) & 0xFF, (raw >> 8) & 0xFF, raw & 0xFF], axis=1).astype(np.uint8)
    return {"sign_mantissa": torch.from_numpy(sign_mantissa), **_encode_exponents(exponent, block_values),
            "shape": list(t.shape)}


# ---------------------------------------------------------------- decoding


def check_parts(parts: dict, raw_bytes: int = 1) -> int:
    """Validate the structure of encoded `parts` (ValueError naming the bad part); returns n values."""
    missing = {"sign_mantissa", "bitstream", "block_offsets", "code_lengths", "block_values", "shape"} - set(parts)
    if missing:
        raise ValueError(f"dfloat11 parts lack {sorted(missing)}")
    shape, block_values = parts["shape"], parts["block_values"]
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"dfloat11 shape must be non-negative ints, got {shape!r}")
    if not isinstance(block_values, int) or block_values < 1:
        raise ValueError(f"dfloat11 block_values must be a positive int, got {block_values!r}")
    n = math.prod(shape)
    for name, dtype in (("sign_mantissa", torch.uint8), ("bitstream", torch.uint8),
                        ("block_offsets", torch.int64), ("code_lengths", torch.uint8)):
        if not isinstance(parts[name], torch.Tensor) or parts[name].dtype != dtype:
            raise ValueError(f"dfloat11 part {name} must be a {dtype} tensor")
    sm = parts["sign_mantissa"]
    expected = (n,) if raw_bytes == 1 else (n, raw_bytes)
    if tuple(sm.shape) != expected:
        raise ValueError(f"dfloat11 sign_mantissa has shape {tuple(sm.shape)}, expected {expected} for shape "
                         f"{shape} (bf16 parts: decode, fp32 parts: decode_fp32)")
    lengths = parts["code_lengths"].cpu().numpy()
    _check_lengths(lengths)
    offsets = parts["block_offsets"].cpu()
    n_blocks = -(-n // block_values)
    if offsets.shape != (n_blocks + 1,):
        raise ValueError(f"dfloat11 block_offsets has shape {tuple(offsets.shape)}, expected ({n_blocks + 1},) "
                         f"for {n} values in blocks of {block_values}")
    total_bits, n_bytes = int(offsets[-1]), parts["bitstream"].numel()
    if int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
        raise ValueError("dfloat11 block_offsets must start at 0 and never decrease")
    if n_bytes != -(-total_bits // 8):
        raise ValueError(f"dfloat11 bitstream has {n_bytes} bytes but block_offsets end at bit {total_bits} "
                         f"({-(-total_bits // 8)} bytes): truncated or padded")
    if n and not lengths.any():
        raise ValueError("dfloat11 code_lengths are all 0 for a non-empty tensor")
    return n


def check_block_ends(ends: torch.Tensor, bad: torch.Tensor, offsets: torch.Tensor) -> None:
    """ValueError when a block hit a bit pattern that is no code, or ended off its next offset."""
    wrong = bad | (ends != offsets[1:])
    if bool(wrong.any()):
        b = int(wrong.nonzero()[0, 0])
        what = "hit a bit pattern that is no code" if bool(bad[b]) else \
            f"ended at bit {int(ends[b])}, but block_offsets[{b + 1}] is {int(offsets[b + 1])}"
        raise ValueError(f"dfloat11 block {b} {what}: corrupt bitstream or block_offsets")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """torch on one CPU thread inside: the decode loop's ops are a few thousand elements each, where an
    OpenMP fork/join per op costs more than it saves (and stalls badly on a busy machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _decode_exponents(parts: dict, n: int, device: str | torch.device) -> torch.Tensor:
    """Exponents uint8 (n,): all blocks advance one symbol per iteration, in lockstep.

    Per iteration: read each block's 32-bit window, look its top FAST_BITS bits up in fast_table; the rare
    windows that start a longer code (or no code) go through the canonical limits (decode_tables)."""
    device = torch.device(device)
    block_values = parts["block_values"]
    offsets = parts["block_offsets"].to(device)
    n_blocks = offsets.numel() - 1
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    lengths = parts["code_lengths"].cpu().numpy()
    fast = fast_table(lengths).to(device)
    limits, base, symbols = (x.to(device) for x in decode_tables(lengths))
    total_bits = int(offsets[-1])
    # zero padding: a window at the end (or past it, for a partial last block) reads zeros
    padded = torch.cat([parts["bitstream"].to(device), torch.zeros(_WINDOW_BYTES, dtype=torch.uint8, device=device)])
    out = torch.empty(n_blocks, block_values, dtype=torch.uint8, device=device)
    pos, bad = offsets[:-1].clone(), torch.zeros(n_blocks, dtype=torch.bool, device=device)
    tail = n - (n_blocks - 1) * block_values  # values in the last block
    tail_pos, tail_bad = pos[-1:].clone(), bad[-1:].clone()
    with _one_cpu_thread(device):
        for i in range(block_values):
            byte = pos >> 3
            window = padded.take(byte).long()
            for k in range(1, _WINDOW_BYTES):  # 40 bits hold a 32-bit window at any bit of the first byte
                window = (window << 8) | padded.take(byte + k)
            x = (window >> (8 - (pos & 7))) & _MASK32
            entry = fast.take(x >> (MAX_CODE_LENGTH - FAST_BITS))
            slow = entry == 0
            if bool(slow.any()):  # codes longer than FAST_BITS, or bits that start no code
                where = slow.nonzero().squeeze(1)
                xs = x[where]
                li = torch.searchsorted(limits, xs, right=True)
                bad[where] |= li == MAX_CODE_LENGTH
                li.clamp_(max=MAX_CODE_LENGTH - 1)
                symbol = symbols[(base[li] + (xs >> (MAX_CODE_LENGTH - 1 - li))).clamp_(0, symbols.numel() - 1)]
                entry[where] = (li + 1) << 8 | symbol
            out[:, i] = entry & 0xFF
            pos = (pos + (entry >> 8)).clamp_max_(total_bits)
            if i == tail - 1:  # the last block is done: keep its state before it runs on over the padding
                tail_pos, tail_bad = pos[-1:].clone(), bad[-1:].clone()
    ends, bads = torch.cat([pos[:-1], tail_pos]), torch.cat([bad[:-1], tail_bad])
    check_block_ends(ends.cpu(), bads.cpu(), offsets.cpu())
    return out.reshape(-1)[:n]


def decode(parts: dict, device: str | torch.device = "cpu") -> torch.Tensor:
    """The bf16 tensor `encode` was given, bit for bit (vectorised torch; the Triton kernel's reference)."""
    n = check_parts(parts, raw_bytes=1)
    exponent = _decode_exponents(parts, n, device).to(torch.int32)
    sm = parts["sign_mantissa"].to(device).to(torch.int32)
    bits = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16).reshape(parts["shape"])


def decode_fp32(parts: dict, device: str | torch.device = "cpu") -> torch.Tensor:
    """The fp32 tensor `encode_fp32` was given, bit for bit."""
    n = check_parts(parts, raw_bytes=3)
    exponent = _decode_exponents(parts, n, device).to(torch.int64)
    sm = parts["sign_mantissa"].to(device).to(torch.int64)
    raw = (sm[:, 0] << 16) | (sm[:, 1] << 8) | sm[:, 2]
    bits = ((raw & 0x800000) << 8) | (exponent << 23) | (raw & 0x7FFFFF)
    return ((bits ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32).reshape(parts["shape"])


def decode_triton(parts: dict) -> torch.Tensor:
    """decode() by the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1); bf16 only."""
    from slimtune.kernels.dfloat11_decode import decode_triton as run  # triton is imported lazily

    return run(parts)


def bits_per_value(parts: dict) -> float:
    """Stored bits per value: raw sign/mantissa, bitstream, block offsets and code table (0.0 if empty)."""
    n = math.prod(parts["shape"])
    if n == 0:
        return 0.0
    total = sum(parts[name].numel() * parts[name].element_size() * 8
                for name in ("sign_mantissa", "bitstream", "block_offsets", "code_lengths"))
    return total / n
