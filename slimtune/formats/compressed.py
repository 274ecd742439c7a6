"""Compressed checkpoints: `slimtune export SRC --format dfloat11 | sparse | sparse-nf4 | sparse-int8`, one loader.

A compressed dir holds the HF `config.json`, the tokenizer, `model.compressed.safetensors` and
`slimtune_compressed.json` (format, version, and per tensor its kind, shape and dtype). Tensor kinds:

  df11    a bf16 tensor, DFloat11-coded (formats/dfloat11.py): lossless, ~10.7 bits per value
  df11f   an fp32 tensor, the same idea on its exponent (lossless, ~26.7 bits per value)
  raw     stored as is (integer tensors, or whatever the codecs do not take)
  mask    a pruned matrix: a bitmask (1 bit per weight, row-major, np.packbits) + the kept values in order
  nm      an N:M pruned matrix: per group of M inputs the index of its kept pattern among the C(M, N)
          (ceil(log2 C) bits each: 3 for 2:4, 7 for 4:8) + the kept values in order
The kept values of `mask` / `nm` are bf16 as they are (`sparse`), or quantized with slimtune's NF4 / INT8
block formats (`sparse-nf4`, `sparse-int8`: blocks of 64 kept values, NF4 scales double-quantized; the
values zero-padded to a whole block). Dense tensors of every format are df11 / df11f coded. Tied weights are
stored once. `load_compressed` decodes tensor by tensor onto a model built on the meta device.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch

from slimtune.formats import dfloat11 as df11

FORMATS = ("hf", "dfloat11", "sparse", "sparse-nf4", "sparse-int8")
MANIFEST, TENSORS = "slimtune_compressed.json", "model.compressed.safetensors"
VALUE_BLOCK = 64


def is_compressed_checkpoint(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_dir() and (path / MANIFEST).is_file()


# ------------------------------------------------------------------ N:M patterns and bitmasks


def _patterns(n: int, m: int) -> torch.Tensor:
    """(C(m, n), m) bool: every way to keep n of m, in lexicographic order of the kept positions."""
    out = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for i, kept in enumerate(itertools.combinations(range(m), n)):
        out[i, list(kept)] = True
    return out


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(G,) ints < 2^bits -> uint8 bytes, `bits` bits per code, MSB first."""
    shifts = torch.arange(bits - 1, -1, -1)
    b = ((codes[:, None] >> shifts) & 1).to(torch.uint8).numpy().reshape(-1)
    return torch.from_numpy(np.packbits(b))


def _unpack_bits(data: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    b = np.unpackbits(data.numpy())[: count * bits]
    if b.size != count * bits:
        raise ValueError(f"pattern stream holds {b.size} bits, {count * bits} needed")
    weights = 2 ** torch.arange(bits - 1, -1, -1)
    return (torch.from_numpy(b.astype(np.int64)).view(count, bits) * weights).sum(1)


def nm_encode(keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(out, in) bool keep-mask with n kept per group of m -> packed pattern indices (uint8 bytes)."""
    groups = keep.reshape(-1, m)
    table = _patterns(n, m)
    # a pattern's index from its kept positions: match the group against the table (C is small: 6 or 70)
    match = (groups[:, None, :] == table[None]).all(-1)
    if not bool(match.any(1).all()):
        raise ValueError(f"a group does not keep exactly {n} of {m}")
    return _pack_bits(match.float().argmax(1), math.ceil(math.log2(len(table))))


def nm_decode(data: torch.Tensor, shape, n: int, m: int) -> torch.Tensor:
    table = _patterns(n, m)
    groups = int(torch.Size(shape).numel()) // m
    codes = _unpack_bits(data, groups, math.ceil(math.log2(len(table))))
    if bool((codes >= len(table)).any()):
        raise ValueError("a pattern index is out of range")
    return table[codes].reshape(shape)


def nm_keep(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The keep-mask of an N:M matrix from its zeros; a group with fewer than n nonzeros (a kept weight that
    is exactly 0) keeps its first zeros too, so every group keeps exactly n (the values stay exact)."""
    g = (w != 0).reshape(-1, m)
    if bool((g.sum(1) > n).any()):
        raise ValueError(f"more than {n} nonzeros in a group of {m}: not {n}:{m} sparse")
    rank = torch.cumsum((~g).int(), 1)  # fill with the first zero positions
    fill = (~g) & (rank <= (n - g.sum(1, keepdim=True)))
    return (g | fill).reshape(w.shape)


# ------------------------------------------------------------------ values


def _encode_values(values: torch.Tensor, codec: str, prefix: str) -> tuple[dict, dict]:
    if codec == "bf16":
        return {f"{prefix}.values": values.to(torch.bfloat16).contiguous()}, {}
    from slimtune.quant.int8 import quantize_int8
    from slimtune.quant.nf4 import quantize_nf4

    count = values.numel()
    padded = torch.zeros(max(VALUE_BLOCK, -(-count // VALUE_BLOCK) * VALUE_BLOCK), dtype=torch.float32)
    padded[:count] = values.float()
    q = quantize_nf4(padded, VALUE_BLOCK, double_quant=True) if codec == "nf4" else quantize_int8(padded, VALUE_BLOCK)
    return {f"{prefix}.{k}": t.contiguous() for k, t in q.tensors().items()}, {
        "values": codec,
        "count": count,
        "padded": padded.numel(),
    }


def _decode_values(parts: dict, record: dict, dtype) -> torch.Tensor:
    codec = record.get("values", "bf16")
    if codec == "bf16":
        return parts["values"].to(dtype)
    from slimtune.quant.int8 import Int8Weight
    from slimtune.quant.nf4 import NF4Weight

    cls = NF4Weight if codec == "nf4" else Int8Weight
    q = cls.from_tensors({k: v for k, v in parts.items()}, (record["padded"],), VALUE_BLOCK)
    return q.dequantize(torch.float32)[: record["count"]].to(dtype)


# ------------------------------------------------------------------ one tensor


def pruned_keep(t: torch.Tensor, nm=None) -> torch.Tensor:
    """The keep-mask of a pruned matrix from its zeros (N:M: exactly n kept per group)."""
    return nm_keep(t, *nm) if nm is not None else t != 0


def encode_tensor(
    name: str, t: torch.Tensor, fmt: str, nm=None, pruned: bool = False, keep: torch.Tensor | None = None
) -> tuple[dict, dict]:
    """(safetensors entries "<name>::<part>", manifest record) of one tensor in format `fmt`. keep: a pruned
    matrix's keep-mask when `t` is not zero exactly off it (default: from t's zeros)."""
    record = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    prefix = f"{name}::"
    if pruned and fmt != "dfloat11" and t.dim() == 2:
        codec = {"sparse": "bf16", "sparse-nf4": "nf4", "sparse-int8": "int8"}[fmt]
        keep = pruned_keep(t, nm) if keep is None else keep
        if nm is not None:
            entries = {f"{prefix}patterns": nm_encode(keep, *nm)}
            record.update(kind="nm", n=nm[0], m=nm[1])
        else:
            entries = {f"{prefix}mask": torch.from_numpy(np.packbits(keep.reshape(-1).numpy()))}
            record["kind"] = "mask"
        values, extra = _encode_values(t.reshape(-1)[keep.reshape(-1)], codec, f"{prefix}v")
        entries.update(values)
        record.update(extra)
        return entries, record
    if t.dtype in (torch.bfloat16, torch.float32) and t.numel():
        parts = df11.encode(t) if t.dtype == torch.bfloat16 else df11.encode_fp32(t)
        record["kind"] = "df11" if t.dtype == torch.bfloat16 else "df11f"
        record["block_values"] = int(parts["block_values"])
        return {f"{prefix}{k}": v for k, v in parts.items() if torch.is_tensor(v)}, record
    record["kind"] = "raw"
    return {f"{prefix}raw": t.contiguous()}, record


def keep_mask(record: dict, parts: dict) -> torch.Tensor | None:
    """The stored keep-mask of a pruned matrix (None for other kinds)."""
    shape = tuple(record["shape"])
    if record["kind"] == "mask":
        n = int(torch.Size(shape).numel())
        bits = np.unpackbits(parts["mask"].numpy())
        if bits.size < n:
            raise ValueError(f"bitmask holds {bits.size} bits, {n} needed")
        return torch.from_numpy(bits[:n].astype(bool)).reshape(shape)
    if record["kind"] == "nm":
        return nm_decode(parts["patterns"], shape, record["n"], record["m"])
    return None


def decode_coded(records: dict[str, dict], parts: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every DFloat11-coded tensor among `records` (name -> manifest record; parts: name -> its stored parts),
    on the CPU: the bf16 ones by the Triton kernel on the GPU when there is one (kernels/dfloat11_decode.py,
    copied back), the rest in one CPU lockstep over all their blocks (tensor by tensor would take 4096
    steps each)."""
    from slimtune.kernels.dfloat11_decode import decode_many, dfloat11_decode
    from slimtune.kernels.dispatch import use_triton

    coded = [n for n, r in records.items() if r.get("kind") in ("df11", "df11f")]
    if not coded:
        return {}
    out = {}
    if torch.cuda.is_available() and use_triton(torch.empty(0, device="cuda")):
        for n in [n for n in coded if records[n]["kind"] == "df11"]:
            one = {**parts.get(n, {}), "shape": records[n]["shape"], "block_values": records[n]["block_values"]}
            out[n] = dfloat11_decode(one, "cuda").cpu()
        coded = [n for n in coded if n not in out]
        if not coded:
            return out
    many = [
        {**parts.get(n, {}), "shape": records[n]["shape"], "block_values": records[n]["block_values"]} for n in coded
    ]
    return {**out, **dict(zip(coded, decode_many(many, [records[n]["kind"] == "df11f" for n in coded])))}


def decode_tensor(name: str, record: dict, parts: dict) -> torch.Tensor:
    shape, dtype = tuple(record["shape"]), getattr(torch, record["dtype"])
    kind = record["kind"]
    if kind == "raw":
        return parts["raw"].reshape(shape)
    if kind in ("df11", "df11f"):
        coded = {**parts, "shape": list(shape), "block_values": record["block_values"]}
        return df11.decode(coded) if kind == "df11" else df11.decode_fp32(coded)
    keep = keep_mask(record, parts)
    if keep is None:
        raise ValueError(f"unknown tensor kind {kind!r}")
    values = _decode_values({k.removeprefix("v."): v for k, v in parts.items() if k.startswith("v.")}, record, dtype)
    if values.numel() != int(keep.sum()):
        raise ValueError(f"{values.numel()} kept values for {int(keep.sum())} kept positions")
    out = torch.zeros(shape, dtype=dtype)
    out[keep] = values
    return out
