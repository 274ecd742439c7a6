"""A run's `final/`: a PEFT (or the adapter family's own) adapter dir, a full model dir, or a quantized
checkpoint; what `slimtune eval`, `export` and PEFT load. (`slimtune export` is trainer/export.py.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from slimtune.config import to_dict
from slimtune.formats.quantized import is_quantized_checkpoint, read_manifest, save_quantized
from slimtune.formats.hf import DTYPES
from slimtune.io import atomic_dir
from slimtune.quant.qat import converted
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


@dataclass(frozen=True)
class FinalFormat:
    """What a run's final/ is, decided once from the recipe (`final_format`); the engines call `write`.

    LoRA: PEFT adapter dir, with the base's quantization recorded so `slimtune eval model.name=path`
    rebuilds the base it was trained on. Full fine-tuning: an HF model dir (+ tokenizer). A base quantized
    together with its factors (LQ-LoRA, LoftQ, EoRA, or a quantized checkpoint): a quantized checkpoint
    dir, since the adapter alone cannot rebuild that base. A QAT run: the quantized checkpoint its
    fake-quantized linears convert to (a LoRA adapter merged). Written atomically."""

    model_name: str  # model.name
    kind: str  # quantized | full | adapter
    fields: dict | None = None  # kind=quantized: the manifest fields (base_model filled in at write time)
    adapter_type: str = "none"
    adapter_options: object = None  # the adapter's own section
    quant: dict | None = None  # quant_record: what an adapter dir records of the base's quantization
    qat_dtype: str | None = None  # a QAT run: its fake-quantized linears converted, in this compute dtype

    def write(self, model: nn.Module, path: Path, base_path: str, tokenizer) -> None:
        if self.kind == "quantized":
            info = {"base_model": base_path, **self.fields, "trained_from": self.model_name}
            if self.qat_dtype is None:
                save_quantized(model, path, tokenizer, info)
                return
            with converted(model, DTYPES[self.qat_dtype]) as plain:
                save_quantized(plain, path, tokenizer, info)
        elif self.kind == "full":
            with atomic_dir(path) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        else:  # the adapter family's own format (adapters/base.py)
            fmt = ADAPTER_FORMATS.get(ADAPTERS.get(self.adapter_type).format)
            fmt.save(model, self.adapter_options, path, self.model_name, base_path, self.quant)


def final_format(cfg) -> FinalFormat:
    """The FinalFormat of RecipeConfig `cfg`."""
    name = cfg.model.name
    if is_quantized_checkpoint(name):
        keep = ("method", "init", "base_model", "budget_bits", "fisher", "allocation")
        manifest = read_manifest(Path(name).expanduser())
        return FinalFormat(name, "quantized", {k: v for k, v in manifest.items() if k in keep})
    if needs_lowrank(cfg):
        fields = {"method": cfg.quant.method, "init": cfg.adapter.init}
        if cfg.adapter.type == "lq_lora" and cfg.lq_lora.pv_tuning:  # its PV linears converted, the factors kept
            return FinalFormat(name, "quantized", {**fields, "pv_tuning": True}, qat_dtype=cfg.model.dtype)
        return FinalFormat(name, "quantized", fields)
    if cfg.qat.method != "none":  # the converted model: the format the run trained against
        fields = {"method": cfg.qat.method, "init": "default", "qat": to_dict(cfg.qat)}
        return FinalFormat(name, "quantized", fields, qat_dtype=cfg.model.dtype)
    if cfg.adapter.type == "none":
        return FinalFormat(name, "full")
    adapter = ADAPTERS.get(cfg.adapter.type)
    return FinalFormat(name, "adapter", None, cfg.adapter.type, options_of(cfg, adapter), quant_record(cfg))


def save_final(model: nn.Module, cfg, path: Path, base_path: str, tokenizer) -> None:
    """final/ of RecipeConfig `cfg` (see FinalFormat)."""
    final_format(cfg).write(model, path, base_path, tokenizer)
