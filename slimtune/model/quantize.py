"""The quantize-or-decompose stage of model setup, and `slimtune quantize` (a checkpoint of its result).

`quantize_base(model, quant, dtype, ...)`: a uniform format (quant.method=nf4, int8, nf3, ..., either
backend) swaps every linear but lm_head for its frozen quantized version; LQ-LoRA (quant.method=lq_lora)
and the LoftQ / EoRA initialisations (adapter.init, the ADAPTER_INITS registry) quantize the targeted
linears together with LoRA factors that start at the low-rank part, from calibration statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from slimtune.adapters.lowrank_setup import LowRankSetup
from slimtune.adapters.lq_lora import apply_lq_lora
from slimtune.calibration import Calibration, calibration_samples
from slimtune.formats.quantized import is_quantized_checkpoint, read_manifest, save_quantized
from slimtune.data import build_splits
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.hardware import fixed_dtype
from slimtune.io import write_json, write_text
from slimtune.formats.hf import DTYPES, load_model, load_tokenizer, resolve_model_dir
from slimtune.quant import quantize_model
from slimtune.registry import ADAPTER_INITS, QUANT_FORMATS
from slimtune.technique import options_of
from slimtune.rules import load_dtype, needs_lowrank


@dataclass(frozen=True)
class Decomposition:
    """A base quantized together with LoRA factors from its full-precision W: LQ-LoRA (method "lq_lora") or
    an adapter.init of the ADAPTER_INITS registry (LoftQ, EoRA, PiSSA), with the sections it reads."""

    method: str
    setup: LowRankSetup
    calibration: Calibration | None = None


def decomposition_of(cfg, train_blocks=None) -> Decomposition | None:
    """The Decomposition RecipeConfig `cfg` asks for (None: a uniform format, or none); train_blocks feed the
    calibration statistics (LQ-LoRA's Fisher sums, EoRA's covariances)."""
    if not needs_lowrank(cfg):
        return None
    setup = LowRankSetup(cfg.quant, cfg.lora, cfg.lq_lora, cfg.adapter.target_modules)
    method = "lq_lora" if cfg.quant.method == "lq_lora" else cfg.adapter.init
    if train_blocks is None:  # LoftQ and PiSSA need no calibration data
        return Decomposition(method, setup)
    samples = calibration_samples(train_blocks, cfg.lq_lora.calibration_samples, cfg.train.seed)
    return Decomposition(method, setup, Calibration(samples, cfg.train.loss_chunk_tokens))


def quantize_base(
    model: nn.Module, quant, dtype: str, options=None, decomposition: Decomposition | None = None, log=print
) -> dict:
    """Quantize `model` in place per `quant` (the quant section; options: the format's own section), or
    quantize + decompose it (`decomposition`); returns the decomposition's summary (empty for a uniform
    format or quant.method=none). What stays unquantized (embeddings, norms, lm_head) is stored frozen in
    `dtype` (model.dtype)."""
    torch_dtype = DTYPES[dtype]
    if quant.method == "none":
        return {}
    if decomposition is not None:
        info = quantize_lowrank(model, decomposition, torch_dtype, log)
    else:
        quantize_model(
            model,
            quant.method,
            backend=quant.backend,
            block_size=quant.block_size,
            double_quant=quant.double_quant,
            compute_dtype=torch_dtype,
            options=options,
        )
        info = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch_dtype and not p.requires_grad:
                p.data = p.data.to(torch_dtype)
    return info


def quantize_stage(model: nn.Module, cfg, train_blocks=None, log=print) -> dict:
    """quantize_base with the sections of RecipeConfig `cfg` (for the setup pipeline and the commands)."""
    options = options_of(cfg, QUANT_FORMATS.technique(cfg.quant.method))
    return quantize_base(model, cfg.quant, cfg.model.dtype, options, decomposition_of(cfg, train_blocks), log)


def quantize_lowrank(model: nn.Module, d: Decomposition, dtype, log=print) -> dict:
    """Quantize `model` (full precision) in place and wrap the targeted linears with LoRA factors that
    start at the low-rank part: LQ-LoRA (bit allocation), or the adapter.init method. Returns the summary."""
    try:
        if d.method == "lq_lora":
            info = apply_lq_lora(model, d.setup, d.calibration, dtype, log)
            log("lq_lora: bit allocation\n" + info["table"])
        else:
            info = ADAPTER_INITS.get(d.method)(model, d.setup, d.calibration, dtype, log)
    except ValueError as e:  # an infeasible budget, a block size that does not divide a matrix, ...
        init = "default" if d.method == "lq_lora" else d.method
        raise ConfigError(f"quant.method={d.setup.quant.method} adapter.init={init}: {e}") from None
    return info


def quantize_command(cfg) -> Path:
    """Write cfg.output_dir: a quantized checkpoint of cfg.model.name at cfg.quant.method (and adapter
    init); prints the allocation table / per-matrix errors and the achieved bits/param."""
    cfg = fixed_dtype(cfg)  # model.dtype=auto not resolved by the command line: fp32
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise SlimtuneError(f"output_dir={str(out)!r} is not empty; pass overwrite=true or another output_dir")
    if cfg.quant.method == "none":
        raise ConfigError("quant.method=none: nothing to quantize; set quant.method=lq_lora, nf4, nf3, int4, ...")
    if is_quantized_checkpoint(cfg.model.name):
        raise ConfigError(
            f"model.name={cfg.model.name!r} is already a quantized checkpoint; give the full-precision model"
        )
    if cfg.quant.backend != "slimtune":
        raise ConfigError(
            f"quant.backend={cfg.quant.backend}: slimtune quantize writes slimtune's own formats; "
            "use quant.backend=slimtune"
        )
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.name)
    model = load_model(cfg.model.name, load_dtype(cfg))
    blocks = None
    if needs_lowrank(cfg):
        blocks = build_splits(
            cfg.data.source, tokenizer, cfg.train.seq_len, cfg.data.eval_fraction, cache_dir=cfg.data.cache_dir or None
        ).train
    info = quantize_stage(model, cfg, blocks)
    fields = {
        "method": cfg.quant.method,
        "init": cfg.adapter.init,
        "base_model": str(resolve_model_dir(cfg.model.name)),
        "seconds": time.perf_counter() - t0,
    }
    if cfg.quant.method == "lq_lora":
        fields.update(budget_bits=cfg.lq_lora.budget_bits, fisher=cfg.lq_lora.fisher, allocation=info["allocation"])
    if "modules" in info:
        fields["errors"] = info["modules"]
    save_quantized(model, out, tokenizer, fields)
    bits = read_manifest(out)["bits_per_param"]
    if "table" in info:
        write_text(out / "allocation.txt", info["table"] + "\n")
    write_json(out / "quantize_report.json", {"bits_per_param": bits, **fields})
    print(
        f"slimtune: wrote {out}/ ({cfg.quant.method}, {bits:.3f} bits/param in the quantized linears, "
        f"{time.perf_counter() - t0:.1f}s)"
    )
    return out
