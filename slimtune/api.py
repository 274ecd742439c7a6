"""The Python API: the stages `slimtune run` uses, for training scripts. Keyword arguments are named like the
config keys of their section (`rank=16` is lora.rank for a LoRA adapter, galore.rank for GaLore), and every
call validates as a recipe would: a combination the CLI refuses is refused here, in the same one line.

    model, tokenizer = slimtune.load("smollm2-135m", quant="nf4")
    slimtune.add_adapter(model, "lora", rank=16, target_modules="all-linear")
    optimizer = slimtune.optimizer(model, "galore", lr=1e-3, rank=64)
    loss = slimtune.loss(model, input_ids, labels)
    slimtune.save(model, "out/final")
    report = slimtune.run("qlora", train={"max_steps": 30})

What slimtune built is recorded on the model (`model.slimtune_config`, a RecipeConfig), so `loss`, `save` and
a later `add_adapter` / `optimizer` see the base's quantization and the adapter's options.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from slimtune import config as C
from slimtune.errors import ConfigError
from slimtune.registry import ADAPTERS, OPTIMIZERS


def config_of(model: nn.Module):
    """The RecipeConfig slimtune built `model` with; for a model it did not load, the defaults with its name and
    parameter dtype."""
    cfg = getattr(model, "slimtune_config", None)
    if cfg is not None:
        return cfg
    name = getattr(getattr(model, "config", None), "name_or_path", "") or "model"
    dtype = "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"
    return C.replace(C.load_config(None), **{"model.name": name, "model.dtype": dtype})


def with_keywords(cfg, sections: tuple[str, ...], call: str, **keywords):
    """cfg with each keyword set in the first of `sections` that has a key of its name, validated."""
    keys = set(C.all_keys())
    dotted = {}
    for name, value in keywords.items():
        section = next((s for s in sections if f"{s}.{name}" in keys), None)
        if section is None:
            valid = sorted(k.split(".", 1)[1] for k in keys if k.split(".", 1)[0] in sections)
            raise ConfigError(
                f"slimtune.{call}: unknown keyword {name!r}; the keys of {', '.join(sections)}: {', '.join(valid)}"
            )
        dotted[f"{section}.{name}"] = list(value) if isinstance(value, tuple) else value
    new = C.replace(cfg, **dotted)
    C.validate(new)
    return new


def load(name: str = "smollm2-135m", quant: str = "none", **keywords):
    """(model, tokenizer): the base `name` (any model.name: a built-in, an HF dir, a quantized checkpoint) on the
    CPU, quantized per `quant` (quant.method). Keywords: model.* (dtype, ...), quant.* (block_size,
    double_quant, backend), lq_lora.* and, for quant="lq_lora", lora.* (rank, alpha); calibration reads data.*
    (source, ...). model.dtype=auto picks the compute dtype from this machine's CPU (or GPU if one is there)."""
    from slimtune.data import splits_for
    from slimtune.formats.hf import load_tokenizer
    from slimtune.hardware import resolve_dtype
    from slimtune.model.pipeline import build_base
    from slimtune.rules import needs_lowrank

    base = C.replace(C.load_config(None), **{"model.name": name, "quant.method": quant})
    cfg = with_keywords(base, ("model", "quant", "lq_lora", "lora", "data", "train"), "load", **keywords)
    if quant == "lq_lora":  # LQ-LoRA installs its own adapters (the decomposition's factors)
        cfg = C.replace(cfg, **{"adapter.type": "lq_lora"})
    cfg, _ = resolve_dtype(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(name)
    blocks = splits_for(cfg, tokenizer).train if needs_lowrank(cfg) else None
    model, _, _, _ = build_base(cfg, blocks, log=lambda s: None)
    model.slimtune_config = cfg
    return model, tokenizer


def add_adapter(model: nn.Module, type: str = "lora", **keywords) -> list[str]:
    """Freeze `model` and wrap its target modules with adapter `type` (any adapter.type; "none": every weight
    trains, as fp32 master weights), in place; returns the wrapped modules' names. Keywords: adapter.*
    (target_modules, init) and the adapter's own section (lora.rank, alpha, dropout, use_rslora;
    sparse_ft.density ...)."""
    from slimtune.model.pipeline import add_adapters

    cfg = config_of(model)
    own = getattr(ADAPTERS.technique(type), "section", None) if type in C.choices("adapter.type") else None
    cfg = C.replace(cfg, **{"adapter.type": type})
    cfg = with_keywords(cfg, ("adapter",) + ((own,) if own else ()), "add_adapter", **keywords)
    add_adapters(model, cfg)
    model.slimtune_config = cfg
    from slimtune.adapters import adapter_modules

    return list(adapter_modules(model))


def optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, **keywords) -> torch.optim.Optimizer:
    """A torch.optim.Optimizer over `model`'s trainable parameters (any optim.name). Keywords: optim.*
    (weight_decay, betas, state_bits, in_backward, lora_plus_ratio, ...) and the optimizer's own section
    (galore.rank, update_gap, ...; frugal.density, ...)."""
    from slimtune.optim import build_optimizer, optimizer_options

    cfg = C.replace(config_of(model), **{"optim.name": name, "train.lr": lr})
    own = getattr(OPTIMIZERS.get(name), "section", None)
    cfg = with_keywords(cfg, ("optim",) + ((own,) if own else ()), "optimizer", **keywords)
    if cfg.optim.cram:
        raise ConfigError(
            "slimtune.optimizer(cram=True): CrAM runs a second backward at perturbed weights, which "
            "slimtune's loop does (slimtune.run); drop cram"
        )
    model.slimtune_config = cfg
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return build_optimizer(cfg.optim, named, lr, optimizer_options(cfg))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """slimtune's schedule (linear warmup, cosine decay to lr x train.min_lr_ratio at max_steps) as a torch
    scheduler: call .step() after each optimizer step, as with any torch scheduler."""
    import dataclasses

    from slimtune.trainer.loop import lr_at

    t = C.load_config(None).train
    t = dataclasses.replace(
        t,
        lr=1.0,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=t.min_lr_ratio if min_lr_ratio is None else min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, t))


def batches(tokenizer, steps: int, **keywords):
    """The micro-batches `slimtune run` trains on, in its order (one process): (input_ids, labels,
    position_ids or None) for each step and micro-step. Keywords: data.* (source, packing, ...) and train.*
    (seq_len, batch_size, grad_accum, seed)."""
    from slimtune.data import BatchOrder, micro_batch, splits_for

    cfg = with_keywords(C.load_config(None), ("data", "train"), "batches", **keywords)
    t, train = cfg.train, splits_for(cfg, tokenizer).train
    order = BatchOrder(len(train), t.seed, train.lengths())
    for step in range(steps):
        for m in range(t.grad_accum):
            yield micro_batch(train, order, step, m, 0, 1, t.batch_size, t.grad_accum)


def loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean cross-entropy over the target tokens of (input_ids, labels), labels as in HF (shifted inside,
    -100 ignored): slimtune's chunked loss (train.loss_chunk_tokens; the logits are never whole), exact for the
    model's family, under bf16 autocast when the model computes in bf16."""
    from slimtune.lm_loss import CausalLMLoss, count_targets

    cfg = config_of(model)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16"):
        total = CausalLMLoss(model, cfg.train.loss_chunk_tokens)(
            input_ids.to(device), labels.to(device), None if position_ids is None else position_ids.to(device)
        )
    return total / max(count_targets(labels), 1)


def hf_inputs(rows) -> dict:
    """A transformers data collator: rows {"input_ids", "labels", "position_ids"} (one per sequence of
    `batches`) stacked into the model's keyword arguments, with packed documents' positions and padding as
    slimtune's loss passes them."""
    from slimtune.lm_loss import position_kwargs

    stacked = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}
    if rows[0].get("position_ids") is not None:
        stacked.update(position_kwargs(torch.stack([r["position_ids"] for r in rows])))
    return stacked


def hf_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers.Trainer's `compute_loss_func`: the same cross-entropy from the model's logits, summed over
    the target tokens and divided by the Trainer's count of them (num_items_in_batch, else this batch's)."""
    logits, targets = outputs.logits[:, :-1].float(), labels[:, 1:].to(outputs.logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / count


def save(model: nn.Module, path, tokenizer=None) -> Path:
    """Write what `slimtune run` writes to final/: a PEFT adapter dir (or the adapter family's own format) with
    the base's quantization recorded, a full model dir, or a quantized checkpoint; atomically. `slimtune eval
    model.name=PATH` and PEFT load it."""
    from slimtune.formats.final import save_final
    from slimtune.formats.hf import base_dir, load_tokenizer

    cfg = config_of(model)
    path = Path(path)
    save_final(model, cfg, path, str(base_dir(cfg.model.name)), tokenizer or load_tokenizer(cfg.model.name))
    return path


def run(recipe: str = "lora", overrides=(), **sections) -> dict:
    """A whole `slimtune run RECIPE` (any recipe name or YAML path); `overrides` as on the command line
    ("train.max_steps=30"), `sections` as dicts (train={"max_steps": 30}) or top-level values
    (output_dir="runs/a"). Returns report.json's dict."""
    from slimtune.trainer.loop import run as run_recipe

    cfg = C.load_config(recipe, list(overrides))
    dotted = {}
    for section, values in sections.items():
        if not isinstance(values, dict):
            dotted[section] = values
            continue
        dotted.update({f"{section}.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})
    if dotted:
        cfg = C.replace(cfg, **dotted)
        C.validate(cfg)
    return run_recipe(cfg)
