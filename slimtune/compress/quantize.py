"""`slimtune quantize`: full-precision model -> quantized (+ low-rank) checkpoint directory.

Also the shared entry `quantize_lowrank(model, cfg, samples)` that the trainer calls when a recipe asks
for LQ-LoRA (quant.method=lq_lora) or a LoftQ / EoRA initialisation of LoRA on a quantized base.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.nn as nn

from slimtune.errors import ConfigError, SlimtuneError


def needs_lowrank(cfg) -> bool:
    """True when the base is quantized together with its low-rank factors (from the full-precision W)."""
    return cfg.quant.method == "lq_lora" or cfg.adapter.init != "default"


def quantize_lowrank(model: nn.Module, cfg, samples, log=print) -> dict:
    """Quantize `model` (full precision) in place and wrap the targeted linears with LoRA factors that
    start at the low-rank part: LQ-LoRA (bit allocation), LoftQ or EoRA. Returns the summary dict."""
    from slimtune.adapters.eora import apply_eora
    from slimtune.adapters.loftq import apply_loftq
    from slimtune.adapters.lq_lora import apply_lq_lora
    from slimtune.models import DTYPES

    dtype = DTYPES[cfg.model.dtype]
    try:
        if cfg.quant.method == "lq_lora":
            info = apply_lq_lora(model, cfg, samples, dtype, log)
            log("lq_lora: bit allocation\n" + info["table"])
        elif cfg.adapter.init == "loftq":
            info = apply_loftq(model, cfg, samples, dtype, log)
        elif cfg.adapter.init == "eora":
            info = apply_eora(model, cfg, samples, dtype, log)
        else:
            raise ConfigError("quantize_lowrank needs quant.method=lq_lora or adapter.init=loftq|eora")
    except ValueError as e:  # an infeasible budget, a block size that does not divide a matrix, ...
        raise ConfigError(f"quant.method={cfg.quant.method} adapter.init={cfg.adapter.init}: {e}") from None
    for m in model.modules():  # what stays unquantized (embeddings, norms, lm_head) is frozen, in dtype
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype and not p.requires_grad:
                p.data = p.data.to(dtype)
    return info


def quantize_command(cfg) -> Path:
    """Write cfg.output_dir: a quantized checkpoint of cfg.model.name at cfg.quant.method (and adapter
    init); prints the allocation table / per-matrix errors and the achieved bits/param."""
    from slimtune.compress.calibration import calibration_samples
    from slimtune.compress.qcheckpoint import is_quantized_checkpoint, save_quantized
    from slimtune.data import build_splits
    from slimtune.models import load_model, load_tokenizer, resolve_model_dir
    from slimtune.quant import quantize_model
    from slimtune.trainer.io import write_json, write_text

    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise SlimtuneError(f"output_dir={str(out)!r} is not empty; pass overwrite=true or another output_dir")
    if cfg.quant.method == "none":
        raise ConfigError("quant.method=none: nothing to quantize; set quant.method=lq_lora, nf4, nf3, int4, ...")
    if is_quantized_checkpoint(cfg.model.name):
        raise ConfigError(f"model.name={cfg.model.name!r} is already a quantized checkpoint; give the "
                          "full-precision model")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.name)
    model = load_model(cfg.model.name, cfg.model.dtype)
    info: dict = {}
    if needs_lowrank(cfg):
        data = build_splits(cfg.data.source, tokenizer, cfg.train.seq_len, cfg.data.eval_fraction)
        samples = calibration_samples(data.train, cfg.lq_lora.calibration_samples, cfg.train.seed)
        info = quantize_lowrank(model, cfg, samples)
    else:
        from slimtune.models import DTYPES

        quantize_model(model, cfg.quant.method, block_size=cfg.quant.block_size,
                       double_quant=cfg.quant.double_quant, compute_dtype=DTYPES[cfg.model.dtype])
    fields = {"method": cfg.quant.method, "init": cfg.adapter.init,
              "base_model": str(resolve_model_dir(cfg.model.name)), "seconds": time.perf_counter() - t0}
    if cfg.quant.method == "lq_lora":
        fields.update(budget_bits=cfg.lq_lora.budget_bits, fisher=cfg.lq_lora.fisher,
                      allocation=info["allocation"])
    if "modules" in info:
        fields["errors"] = info["modules"]
    save_quantized(model, out, tokenizer, fields)
    from slimtune.compress.qcheckpoint import read_manifest

    bits = read_manifest(out)["bits_per_param"]
    if "table" in info:
        write_text(out / "allocation.txt", info["table"] + "\n")
    write_json(out / "quantize_report.json", {"bits_per_param": bits, **fields})
    print(f"slimtune: wrote {out}/ ({cfg.quant.method}, {bits:.3f} bits/param in the quantized linears, "
          f"{time.perf_counter() - t0:.1f}s)")
    return out
