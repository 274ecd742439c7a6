"""A run's `final/`: a PEFT (or the adapter family's own) adapter dir, a full model dir, or a quantized
checkpoint; what `slimtune eval`, `export` and PEFT load. (`slimtune export` is trainer/export.py.)"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimtune.config import to_dict
from slimtune.formats.quantized import is_quantized_checkpoint, read_manifest, save_quantized
from slimtune.io import atomic_dir
from slimtune.registry import ADAPTER_FORMATS, ADAPTERS, QUANT_FORMATS
from slimtune.rules import needs_lowrank
from slimtune.technique import options_of


def quant_record(cfg) -> dict | None:
    """What an adapter dir records of the base's quantization: the quant section and, under "options", the
    format's own section (when it declares one), so that eval rebuilds exactly the base the adapter trained on."""
    if cfg.quant.method == "none":
        return None
    record = to_dict(cfg.quant)
    options = options_of(cfg, QUANT_FORMATS.technique(cfg.quant.method))
    if options is not None:
        record["options"] = to_dict(options)
    return record


def save_final(model: nn.Module, cfg, path: Path, base_path: str, tokenizer) -> None:
    """LoRA: PEFT adapter dir, with the base's quantization recorded so `slimtune eval model.name=path`
    rebuilds the base it was trained on. Full fine-tuning: an HF model dir (+ tokenizer). A base quantized
    together with its factors (LQ-LoRA, LoftQ, EoRA, or a quantized checkpoint): a quantized checkpoint
    dir, since the adapter alone cannot rebuild that base. Written atomically."""
    if is_quantized_checkpoint(cfg.model.name) or needs_lowrank(cfg):
        info = {"method": cfg.quant.method, "init": cfg.adapter.init, "base_model": base_path}
        if is_quantized_checkpoint(cfg.model.name):
            info = {
                k: v
                for k, v in read_manifest(Path(cfg.model.name).expanduser()).items()
                if k in ("method", "init", "base_model", "budget_bits", "fisher", "allocation")
            }
        save_quantized(model, path, tokenizer, {**info, "trained_from": cfg.model.name})
    elif cfg.adapter.type == "none":
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:  # the adapter family's own format (adapters/base.py)
        quant = quant_record(cfg)
        adapter = ADAPTERS.get(cfg.adapter.type)
        fmt = ADAPTER_FORMATS.get(adapter.format)
        fmt.save(model, options_of(cfg, adapter), path, cfg.model.name, base_path, quant)
