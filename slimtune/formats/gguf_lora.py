"""`slimtune export RUN --format gguf-lora`: a run's LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli -m BASE.gguf
--lora RUN/adapter.gguf`, Ollama's ADAPTER), for the base exported with `--format gguf`.

Per adapted linear: `blk.N.<name>.weight.lora_a` = A (rank x in) and `.lora_b` = B (out x rank), f32, B's rows
in the base GGUF's order (Llama q / k reordered for rotary, as formats/gguf.py writes the weights); llama.cpp
adds (alpha / rank) B A, so `adapter.lora.alpha` is written as the scaling the run trained with times the rank
(rsLoRA's alpha / sqrt(rank) included). Plain LoRA only (DoRA's magnitude vector has no GGUF form).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slimtune.errors import SlimtuneError
from slimtune.formats.gguf import ARCHS, finish, gguf_name, row_order, writable


def read_peft_lora(adapter_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config.json, module name -> (A, B)) of a PEFT LoRA dir; refuses what GGUF LoRA cannot hold."""
    from safetensors.torch import load_file

    cfg_file, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not (cfg_file.is_file() and weights.is_file()):
        raise SlimtuneError(
            f"{adapter_dir}: no PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors); "
            "--format gguf-lora exports a LoRA run's final/ (use --format gguf for a full or QAT run)"
        )
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
        raise SlimtuneError(
            f"{cfg_file}: GGUF LoRA holds plain LoRA with one rank and alpha (not DoRA, not per-module ranks or "
            "alphas); export the merged model with --format gguf instead"
        )
    factors: dict[str, dict] = {}
    for key, t in load_file(str(weights)).items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key.removesuffix(marker).removeprefix("base_model.model.")
                factors.setdefault(module, {})[part] = t.float()
    return cfg, {m: (f["lora_A"], f["lora_B"]) for m, f in factors.items()}


def write_gguf_lora(adapter_dir: Path, base_config, path: Path) -> dict:
    """Write the LoRA of `adapter_dir` for a base of HF config `base_config` to the GGUF file `path`."""
    import gguf

    cfg, factors = read_peft_lora(adapter_dir)
    arch = ARCHS.get((base_config.architectures or ["?"])[0])
    if arch is None:
        raise SlimtuneError(
            f"export --format gguf-lora writes {', '.join(ARCHS)} adapters, not {base_config.architectures}"
        )
    rank = int(cfg["r"])
    scaling = cfg["lora_alpha"] / (rank**0.5 if cfg.get("use_rslora") else rank)
    tensors = []
    for module, (a, b) in sorted(factors.items()):
        stem = gguf_name(module, arch)
        if stem is None or not stem.startswith("blk.") or stem.endswith("norm"):
            raise SlimtuneError(f"{adapter_dir}: the adapter on {module} has no place in a llama.cpp LoRA GGUF")
        order = row_order(base_config, arch, stem, b.shape[0])
        b = b[order] if order is not None else b
        tensors += [(f"{stem}.weight.lora_a", a), (f"{stem}.weight.lora_b", b)]
    tmp = writable(path)
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scaling * rank))
    for name, t in tensors:
        w.add_tensor(name, np.ascontiguousarray(t.contiguous().numpy(), dtype=np.float32))
    finish(w, tmp, path)
    return {"path": str(path), "architecture": arch, "rank": rank, "alpha": scaling * rank, "modules": len(factors)}
