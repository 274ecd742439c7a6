"""DFloat11 decode, the torch reference of dfloat11_decode.py's kernel: the canonical Huffman tables, the input
checks both paths share, and `decode` / `decode_many`, where all blocks step through their codes in lockstep,
one torch op at a time (on CPU or any device)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

MAX_CODE_LENGTH = 32  # the decoders read one 32-bit window per symbol
_WINDOW_BYTES = 5  # a 32-bit window starting at any bit lies within 5 bytes
FAST_BITS = 16  # the torch decoder's lookup table covers codes of up to 16 bits (65536 entries)
_MASK32 = (1 << 32) - 1


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
    return (
        torch.tensor(limits, dtype=torch.int64),
        torch.tensor(base, dtype=torch.int64),
        torch.tensor(symbols, dtype=torch.int64),
    )


def fast_table(lengths: np.ndarray) -> torch.Tensor:
    """(2**FAST_BITS,) int64 lookup on a window's top FAST_BITS bits: length << 8 | symbol of the code
    they start, or 0 when that code is longer (or there is none). Canonical codes taken in order fill
    the table from 0 upwards, each over 2**(FAST_BITS - length) entries."""
    short = [s for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)) if lengths[s] <= FAST_BITS]
    entries = np.repeat(
        np.array([int(lengths[s]) << 8 | int(s) for s in short], dtype=np.int64),
        [1 << (FAST_BITS - int(lengths[s])) for s in short],
    )
    table = np.zeros(1 << FAST_BITS, dtype=np.int64)
    table[: len(entries)] = entries
    return torch.from_numpy(table)


# ---------------------------------------------------------------- encoding


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
    for name, dtype in (
        ("sign_mantissa", torch.uint8),
        ("bitstream", torch.uint8),
        ("block_offsets", torch.int64),
        ("code_lengths", torch.uint8),
    ):
        if not isinstance(parts[name], torch.Tensor) or parts[name].dtype != dtype:
            raise ValueError(f"dfloat11 part {name} must be a {dtype} tensor")
    sm = parts["sign_mantissa"]
    expected = (n,) if raw_bytes == 1 else (n, raw_bytes)
    if tuple(sm.shape) != expected:
        raise ValueError(
            f"dfloat11 sign_mantissa has shape {tuple(sm.shape)}, expected {expected} for shape "
            f"{shape} (bf16 parts: decode, fp32 parts: decode_fp32)"
        )
    lengths = parts["code_lengths"].cpu().numpy()
    _check_lengths(lengths)
    offsets = parts["block_offsets"].cpu()
    n_blocks = -(-n // block_values)
    if offsets.shape != (n_blocks + 1,):
        raise ValueError(
            f"dfloat11 block_offsets has shape {tuple(offsets.shape)}, expected ({n_blocks + 1},) "
            f"for {n} values in blocks of {block_values}"
        )
    total_bits, n_bytes = int(offsets[-1]), parts["bitstream"].numel()
    if int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
        raise ValueError("dfloat11 block_offsets must start at 0 and never decrease")
    if n_bytes != -(-total_bits // 8):
        raise ValueError(
            f"dfloat11 bitstream has {n_bytes} bytes but block_offsets end at bit {total_bits} "
            f"({-(-total_bits // 8)} bytes): truncated or padded"
        )
    if n and not lengths.any():
        raise ValueError("dfloat11 code_lengths are all 0 for a non-empty tensor")
    return n


def check_block_ends(ends: torch.Tensor, bad: torch.Tensor, offsets: torch.Tensor) -> None:
    """ValueError when a block hit a bit pattern that is no code, or ended off its next offset."""
    wrong = bad | (ends != offsets[1:])
    if bool(wrong.any()):
        b = int(wrong.nonzero()[0, 0])
        what = (
            "hit a bit pattern that is no code"
            if bool(bad[b])
            else f"ended at bit {int(ends[b])}, but block_offsets[{b + 1}] is {int(offsets[b + 1])}"
        )
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


def _decode_exponents_many(many: list[dict], sizes: list[int], device) -> list[torch.Tensor]:
    """_decode_exponents for several tensors in ONE lockstep: their bitstreams concatenated, each block
    reading its own tensor's tables (stacked), so a model's matrices take block_values steps in all instead
    of block_values each. Every tensor must use the same block_values."""
    device = torch.device(device)
    bv = many[0]["block_values"]
    if any(p["block_values"] != bv for p in many):
        raise ValueError("decode_many: every tensor must have the same block_values")
    fast, limits, base, symbols, streams, starts, counts, tids, ends_want = [], [], [], [], [], [], [], [], []
    byte_start = 0
    for t, (p, n) in enumerate(zip(many, sizes)):
        lengths = p["code_lengths"].cpu().numpy()
        fast.append(fast_table(lengths))
        lim, bas, sym = decode_tables(lengths)
        limits.append(lim)
        base.append(bas)
        symbols.append(torch.nn.functional.pad(sym, (0, 256 - sym.numel())))
        off = p["block_offsets"].cpu()
        nb = off.numel() - 1
        starts.append(off[:-1] + 8 * byte_start)
        ends_want.append(off[1:] + 8 * byte_start)
        counts.append(torch.clamp(n - torch.arange(nb) * bv, max=bv))
        tids.append(torch.full((nb,), t, dtype=torch.int64))
        streams.append(p["bitstream"].cpu())
        byte_start += p["bitstream"].numel()
    fast_t = torch.stack(fast).reshape(-1).to(device)
    limits_t, base_t, symbols_t = (torch.stack(x).to(device) for x in (limits, base, symbols))
    padded = torch.cat([*streams, torch.zeros(_WINDOW_BYTES, dtype=torch.uint8)]).to(device)
    pos = torch.cat(starts).to(device)
    count, tid = torch.cat(counts).to(device), torch.cat(tids).to(device)
    total_bits = 8 * byte_start
    out = torch.empty(pos.numel(), bv, dtype=torch.uint8, device=device)
    ends, bad = pos.clone(), torch.zeros(pos.numel(), dtype=torch.bool, device=device)
    fast_base = tid * (1 << FAST_BITS)
    with _one_cpu_thread(device):
        for i in range(bv):
            byte = pos >> 3
            window = padded.take(byte).long()
            for k in range(1, _WINDOW_BYTES):
                window = (window << 8) | padded.take(byte + k)
            x = (window >> (8 - (pos & 7))) & _MASK32
            entry = fast_t.take(fast_base + (x >> (MAX_CODE_LENGTH - FAST_BITS)))
            slow = entry == 0
            if bool(slow.any()):
                where = slow.nonzero().squeeze(1)
                xs, tw = x[where], tid[where]
                li = torch.searchsorted(limits_t[tw], xs[:, None], right=True).squeeze(1)
                bad[where] |= (li == MAX_CODE_LENGTH) & (i < count[where])
                li.clamp_(max=MAX_CODE_LENGTH - 1)
                idx = (base_t[tw, li] + (xs >> (MAX_CODE_LENGTH - 1 - li))).clamp_(0, 255)
                entry[where] = (li + 1) << 8 | symbols_t[tw, idx]
            out[:, i] = entry & 0xFF
            pos = (pos + (entry >> 8)).clamp_max_(total_bits)
            ends = torch.where(count == i + 1, pos, ends)  # a block's state when its last value is read
    check_block_ends(ends.cpu(), bad.cpu(), torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(ends_want)]))
    result, b0 = [], 0
    for n, c in zip(sizes, counts):
        result.append(out[b0 : b0 + c.numel()].reshape(-1)[:n])
        b0 += c.numel()
    return result


def _assemble_bf16(exponent: torch.Tensor, parts: dict, device) -> torch.Tensor:
    sm = parts["sign_mantissa"].to(device).to(torch.int32)
    bits = ((sm & 0x80) << 8) | (exponent.to(torch.int32) << 7) | (sm & 0x7F)
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16).reshape(parts["shape"])


def decode_many(many: list[dict], fp32: list[bool] | None = None, device: str | torch.device = "cpu") -> list:
    """decode / decode_fp32 of several tensors at once (one lockstep over all their blocks), bit for bit."""
    fp32 = fp32 or [False] * len(many)
    sizes = [check_parts(p, raw_bytes=3 if f else 1) for p, f in zip(many, fp32)]
    keep = [i for i, n in enumerate(sizes) if n > 0]
    exps = (
        dict(zip(keep, _decode_exponents_many([many[i] for i in keep], [sizes[i] for i in keep], device)))
        if keep
        else {}
    )
    out = []
    for i, (p, f) in enumerate(zip(many, fp32)):
        e = exps.get(i, torch.zeros(0, dtype=torch.uint8, device=device))
        out.append(_assemble_fp32(e, p, device) if f else _assemble_bf16(e, p, device))
    return out


def decode(parts: dict, device: str | torch.device = "cpu") -> torch.Tensor:
    """The bf16 tensor `encode` was given, bit for bit (vectorised torch; the Triton kernel's reference)."""
    n = check_parts(parts, raw_bytes=1)
    return _assemble_bf16(_decode_exponents(parts, n, device), parts, device)


def decode_fp32(parts: dict, device: str | torch.device = "cpu") -> torch.Tensor:
    """The fp32 tensor `encode_fp32` was given, bit for bit."""
    n = check_parts(parts, raw_bytes=3)
    return _assemble_fp32(_decode_exponents(parts, n, device), parts, device)


def _assemble_fp32(exponent: torch.Tensor, parts: dict, device) -> torch.Tensor:
    exponent = exponent.to(torch.int64)
    sm = parts["sign_mantissa"].to(device).to(torch.int64)
    raw = (sm[:, 0] << 16) | (sm[:, 1] << 8) | sm[:, 2]
    bits = ((raw & 0x800000) << 8) | (exponent << 23) | (raw & 0x7FFFFF)
    return ((bits ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32).reshape(parts["shape"])
