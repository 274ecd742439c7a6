"""`slimtune export SRC --format compressed-tensors`: a quantized (and possibly 2:4-pruned) model in the
compressed-tensors layout vLLM and transformers load (`quantization_config.quant_method = compressed-tensors`,
format `pack-quantized`), written from slimtune's own codes: no re-quantization.

Per quantized linear `<name>`: `weight_packed` int32 (out, ceil(in * bits / 32)): each run of 32 codes, offset to
unsigned (q + 2^(bits-1)), packed densely little-end first into `bits` words; `weight_scale` fp32 (out, in / group)
(the scales the codes were computed against, exactly: vLLM casts them to its dtype); `weight_shape` int64
[out, in]. Grids that are compressed-tensors' symmetric int (x = q * scale per group of a row):
  slimtune int2..int8 (symmetric, 2^k - 1 levels), a block size that divides the row: group = block size
  int8 (absmax / 127 per block)                                                      group = block size
  llama.cpp's q4_0, q5_0, q8_0 (fp16 d per 32 values)                                 group = 32
NF-k, asymmetric int (a float zero), q4_1 / q5_1 and the K types have no compressed-tensors grid and are refused
in one line. Each distinct (bits, group) gets a config group targeting its layers by name; the other linears stay
dense. A model whose quantized layers are all 2:4 sparse (at most 2 nonzeros in every 4 along a row) says so in
`sparsity_config` (format dense, structure 2:4).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir
from slimtune.quant.ggml import GGMLLinear
from slimtune.quant.int8 import Int8Linear
from slimtune.quant.linear import FrozenQuantLinear
from slimtune.quant.packed import PackedLinear
from slimtune.quant.packing import unpack_bits

GGML_GRIDS = ("q4_0", "q5_0", "q8_0")  # symmetric, fp16 d per 32 values


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) signed codes in [-2^(bits-1), 2^(bits-1)) -> (rows, ceil(cols * bits / 32)) int32: code i of a
    row at bit i * bits of the row's little-endian bit stream (32 codes fill `bits` words exactly)."""
    rows, cols = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))).clamp(0, (1 << bits) - 1)
    u = nn.functional.pad(u, (0, -cols % 32)).view(rows, -1, 32)
    start = torch.arange(32) * bits
    word, offset = start // 32, start % 32
    out = torch.zeros(rows, u.shape[1], bits, dtype=torch.int64)
    out.scatter_add_(2, word.expand_as(u), (u << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32
    if spill.any():
        high = u[..., spill] >> (32 - offset[spill])
        out.scatter_add_(2, (word[spill] + 1).expand_as(high), high)
    out = out.view(rows, -1)[:, : math.ceil(cols * bits / 32)]
    return (out - (out >= 2**31).long() * 2**32).to(torch.int32)


def codes_and_scales(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(codes (out, in) int64 signed, scales fp32 (out, in / group), bits, group) of a quantized linear on a
    compressed-tensors grid; a SlimtuneError naming the layer and its format otherwise."""
    out_f, in_f = module.out_features, module.in_features
    fmt = getattr(module, "fmt", None)
    if isinstance(module, GGMLLinear) and fmt.stored_type((out_f, in_f)) in GGML_GRIDS:
        q, d, _ = module._packed().codes_and_scales()
        bits = {"q4_0": 4, "q5_0": 5, "q8_0": 8}[fmt.stored_type((out_f, in_f))]
        return q.view(out_f, in_f), d.view(out_f, -1), bits, 32
    if isinstance(module, Int8Linear) and in_f % fmt.block_size == 0:
        packed = module._packed()
        scale = packed.absmax.float() / 127
        return packed.codes.long().view(out_f, in_f), scale.view(out_f, -1), 8, fmt.block_size
    if isinstance(module, PackedLinear) and fmt.kind == "int" and in_f % fmt.block_size == 0:
        packed = module._packed()
        qmax = 2 ** (fmt.bits - 1) - 1
        q = unpack_bits(packed.codes, fmt.bits, out_f * in_f).long() - qmax
        return q.view(out_f, in_f), packed.block_scale().view(out_f, -1), fmt.bits, fmt.block_size
    shown = getattr(fmt, "name", type(module).__name__)
    raise SlimtuneError(
        f"{name}: {shown} has no compressed-tensors grid (it takes symmetric int-k with a block size that divides "
        f"the row, int8, q4_0, q5_0, q8_0); quantize with one of those (slimtune quantize ... quant.method=int4 "
        "quant.block_size=64, or a qat run) or use --format gguf"
    )


def _is_24(w: torch.Tensor) -> bool:
    return w.shape[-1] % 4 == 0 and bool(((w.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def write_compressed_tensors(model: nn.Module, tokenizer, path: Path) -> dict:
    """Write `model` (HF causal LM with slimtune-quantized linears) and `tokenizer` to the directory `path`
    (atomically). Returns the export's summary."""
    from safetensors.torch import save_file

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, FrozenQuantLinear)}
    if not quantized:
        raise SlimtuneError(
            "export --format compressed-tensors writes quantized linears from their codes and this model has none; "
            "quantize it first (slimtune quantize ... quant.method=int4, or a qat run) or use --format hf"
        )
    state, groups, sparse24, zeros, numel = {}, {}, True, 0, 0
    for name, module in quantized.items():
        q, scale, bits, group = codes_and_scales(module, name)
        state[f"{name}.weight_packed"] = pack_int32(q, bits)
        state[f"{name}.weight_scale"] = scale.contiguous()
        state[f"{name}.weight_shape"] = torch.tensor([module.out_features, module.in_features])
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().contiguous()
        groups.setdefault((bits, group), []).append(name)
        sparse24 &= _is_24(q)
        zeros, numel = zeros + int((q == 0).sum()), numel + q.numel()
    inside = tuple(f"{n}." for n in quantized)
    for k, t in model.state_dict().items():
        if not k.startswith(inside):
            state.setdefault(k, t.detach().contiguous())
    if getattr(model.config, "tie_word_embeddings", False):  # stored once, as transformers saves a tied head
        state.pop("lm_head.weight", None)
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {
                "targets": [f"re:^{re.escape(n)}$" for n in names],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": True,
                    "group_size": group,
                    "strategy": "group",
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
            for i, ((bits, group), names) in enumerate(sorted(groups.items()))
        },
        "ignore": [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized],
        "kv_cache_scheme": None,
    }
    if sparse24:
        config["sparsity_config"] = {
            "format": "dense",
            "sparsity_structure": "2:4",
            "global_sparsity": zeros / max(numel, 1),
            "targets": [f"re:^{re.escape(n)}$" for n in quantized],
            "ignore": [],
        }
    with atomic_dir(Path(path)) as tmp:
        model.config.save_pretrained(tmp)
        written = json.loads((tmp / "config.json").read_text())
        written.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps({**written, "quantization_config": config}, indent=2) + "\n")
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {
        "path": str(path),
        "format": "compressed-tensors",
        "quantized": len(quantized),
        "groups": {f"int{bits}/group {group}": len(names) for (bits, group), names in sorted(groups.items())},
        "sparsity": "2:4" if sparse24 else None,
    }
