"""Final artefacts: `final/` (PEFT adapter or full model) and `slimtune export RUN_DIR --merge`."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.trainer.io import atomic_dir


def save_final(model: nn.Module, cfg, path: Path, base_path: str, tokenizer) -> None:
    """LoRA: PEFT adapter dir. Full fine-tuning: an HF model dir (+ tokenizer). A base quantized together
    with its factors (LQ-LoRA, LoftQ, EoRA, or a quantized checkpoint): a quantized checkpoint dir, since
    the adapter alone cannot rebuild that base. Written atomically."""
    from slimtune.compress.qcheckpoint import is_quantized_checkpoint, read_manifest, save_quantized
    from slimtune.compress.quantize import needs_lowrank

    if is_quantized_checkpoint(cfg.model.name) or needs_lowrank(cfg):
        info = {"method": cfg.quant.method, "init": cfg.adapter.init, "base_model": base_path}
        if is_quantized_checkpoint(cfg.model.name):
            info = {k: v for k, v in read_manifest(Path(cfg.model.name).expanduser()).items()
                    if k in ("method", "init", "base_model", "budget_bits", "fisher", "allocation")}
        save_quantized(model, path, tokenizer, {**info, "trained_from": cfg.model.name})
    elif cfg.adapter.type == "none":
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        from slimtune.adapters.peft_format import save_peft_adapter

        save_peft_adapter(model, cfg.adapter, path, cfg.model.name, base_path)


def export_merged(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Merge `run_dir/final` into the full-precision base and write an HF model dir that
    `AutoModelForCausalLM.from_pretrained` loads. Quantized runs merge into the original (unquantized)
    base weights, as PEFT's merge_and_unload does for a re-loaded base."""
    from slimtune.adapters import adapter_modules, unwrap_adapters
    from slimtune.adapters.peft_format import load_peft_adapter
    from slimtune.config import load_config
    from slimtune.models import load_model, load_tokenizer

    run_dir = Path(run_dir)
    final = run_dir / "final"
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file() or not final.is_dir():
        raise SlimtuneError(f"{run_dir}: not a finished slimtune run (needs config.yaml and final/); "
                            "give the output_dir of a completed `slimtune run`")
    cfg = load_config(str(cfg_path))
    out = Path(out_dir) if out_dir else run_dir / "merged"
    tokenizer = load_tokenizer(cfg.model.name)
    from slimtune.compress.qcheckpoint import dequantize_to_dense, is_quantized_checkpoint

    if is_quantized_checkpoint(str(final)):  # LQ-LoRA / LoftQ / EoRA: W = dequant(Q) + delta, dense
        model = load_model(str(final), cfg.model.dtype)
        dequantize_to_dense(model)
    elif (final / "adapter_config.json").is_file():
        model = load_model(cfg.model.name, cfg.model.dtype)
        load_peft_adapter(model, final)
        for m in adapter_modules(model).values():
            m.merge(safe=True)
        unwrap_adapters(model)
    else:
        model = load_model(str(final), cfg.model.dtype)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
