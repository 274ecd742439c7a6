"""DFloat11 decode (slimtune.formats.dfloat11): Huffman-coded bf16 exponents back to bf16, on the GPU.

The torch reference (`decode`, dfloat11_reference.py; formats/dfloat11.py holds the encoder): all blocks step
through their codes in lockstep, one torch op at a time. Here one program owns BLOCKS_PER_PROGRAM blocks, one
lane each, and a lane walks its block in a loop; per value it
  * loads the 5 bytes holding the 32-bit window at its bit position (MSB-first) and shifts the window out;
  * finds the code length li + 1 as the number of canonical limits <= window (a (lanes, 32) compare
    against the 32 limits, loaded once), and the exponent as symbols[base[li] + (window >> (31 - li))];
  * loads the value's sign/mantissa byte, writes sign << 15 | exponent << 7 | mantissa as int16 (the
    output is viewed as bf16 afterwards: every bit pattern, NaN payloads included, survives).
Integer ops only, so the interpreter (TRITON_INTERPRET=1) runs it bit-exactly on CPU. Each lane records
where its block ended and whether it met a bit pattern that is no code; the host checks both against
block_offsets (one device sync) and raises ValueError like the reference.
"""

from __future__ import annotations


import torch

from slimtune.errors import ConfigError
from slimtune.kernels.dfloat11_reference import (  # noqa: F401  (the torch reference, re-exported)
    FAST_BITS,
    MAX_CODE_LENGTH,
    _check_lengths,
    canonical_codes,
    check_block_ends,
    check_parts,
    decode,
    decode_fp32,
    decode_many,
    decode_tables,
    fast_table,
)
from slimtune.kernels.dispatch import interpreting, triton_available, triton_enabled, use_triton

if triton_enabled():
    import triton
    import triton.language as tl

BLOCKS_PER_PROGRAM = 32  # lanes per program on the GPU: one warp, one block per thread
INTERPRET_BLOCKS_PER_PROGRAM = 256  # the interpreter's cost is per op, not per lane: fewer, wider programs
NUM_WARPS = 1


if triton_enabled():

    @triton.jit
    def _dfloat11_decode_kernel(
        bits_ptr,
        n_bytes,
        total_bits,
        offsets_ptr,
        sign_mantissa_ptr,
        limits_ptr,
        base_ptr,
        symbols_ptr,
        n_symbols,
        out_ptr,
        ends_ptr,
        bad_ptr,
        n,
        n_blocks,
        block_values,
        MAX_LEN: tl.constexpr,
        BLOCKS: tl.constexpr,
    ):
        """out[v] = bf16 bits (int16) of value v for the BLOCKS blocks of this program."""
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        live = block < n_blocks
        pos = tl.load(offsets_ptr + block, mask=live, other=0)  # int64 bit position
        first_value = block.to(tl.int64) * block_values
        count = tl.minimum(n - first_value, block_values)
        limits = tl.load(limits_ptr + tl.arange(0, MAX_LEN))
        bad = tl.zeros([BLOCKS], dtype=tl.int32)
        for i in range(0, block_values):
            active = live & (i < count)
            byte = pos >> 3
            window = tl.zeros([BLOCKS], dtype=tl.int64)
            for k in tl.static_range(5):  # 40 bits: a 32-bit window at any bit offset of its first byte
                b = tl.load(bits_ptr + byte + k, mask=active & (byte + k < n_bytes), other=0)
                window = (window << 8) | b.to(tl.int64)
            x = (window >> (8 - (pos & 7))) & 0xFFFFFFFF
            li = tl.sum((x[:, None] >= limits[None, :]).to(tl.int32), axis=1)
            bad = bad | (active & (li == MAX_LEN)).to(tl.int32)
            li = tl.minimum(li, MAX_LEN - 1)
            index = tl.load(base_ptr + li, mask=active, other=0) + (x >> (MAX_LEN - 1 - li).to(tl.int64))
            index = tl.minimum(tl.maximum(index, 0), n_symbols - 1)
            exponent = tl.load(symbols_ptr + index, mask=active, other=0).to(tl.int32)
            v = first_value + i
            sm = tl.load(sign_mantissa_ptr + v, mask=active, other=0).to(tl.int32)
            bits = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)
            tl.store(out_ptr + v, ((bits ^ 0x8000) - 0x8000).to(tl.int16), mask=active)
            pos = tl.where(active, tl.minimum(pos + li.to(tl.int64) + 1, total_bits), pos)
        tl.store(ends_ptr + block, pos, mask=live)
        tl.store(bad_ptr + block, bad, mask=live)


def decode_triton(parts: dict, check: bool = True) -> torch.Tensor:
    """decode(parts) by the kernel, on the device of parts["bitstream"] (CUDA, or CPU under the interpreter).

    check: verify every block ended at its offset and met only valid codes (ValueError; one device sync)."""
    n = check_parts(parts, raw_bytes=1)
    bitstream = parts["bitstream"].contiguous()
    device = bitstream.device
    if not triton_available():
        raise ConfigError("decode_triton needs triton (pip install triton); dfloat11.decode is the torch path")
    if device.type != "cuda" and not interpreting():
        raise ConfigError(
            f"decode_triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {device}; "
            "use dfloat11.decode"
        )
    out = torch.empty(n, dtype=torch.int16, device=device)
    offsets = parts["block_offsets"].to(device)
    n_blocks = offsets.numel() - 1
    if n == 0:
        return out.view(torch.bfloat16).reshape(parts["shape"])
    limits, base, symbols = (x.to(device) for x in decode_tables(parts["code_lengths"].cpu().numpy()))
    ends = torch.empty(n_blocks, dtype=torch.int64, device=device)
    bad = torch.empty(n_blocks, dtype=torch.int32, device=device)
    lanes = INTERPRET_BLOCKS_PER_PROGRAM if interpreting() else BLOCKS_PER_PROGRAM
    grid = (triton.cdiv(n_blocks, lanes),)
    _dfloat11_decode_kernel[grid](
        bitstream,
        bitstream.numel(),
        int(parts["block_offsets"][-1]),
        offsets,
        parts["sign_mantissa"].to(device).contiguous(),
        limits,
        base,
        symbols,
        symbols.numel(),
        out,
        ends,
        bad,
        n,
        n_blocks,
        parts["block_values"],
        MAX_LEN=MAX_CODE_LENGTH,
        BLOCKS=lanes,
        num_warps=NUM_WARPS,
    )
    if check:
        check_block_ends(ends.cpu(), bad.cpu().bool(), offsets.cpu())
    return out.view(torch.bfloat16).reshape(parts["shape"])


def dfloat11_decode(parts: dict, device: str | torch.device = "cpu") -> torch.Tensor:
    """The bf16 tensor of DFloat11 `parts`, on `device`: the Triton kernel when use_triton() says so for
    tensors there (CUDA and triton installed), else the torch reference `decode`."""
    probe = torch.empty(0, device=device)
    if use_triton(probe):
        return decode_triton({**parts, **{k: v.to(device) for k, v in parts.items() if isinstance(v, torch.Tensor)}})
    return decode(parts, device)
