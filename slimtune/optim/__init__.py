"""Optimizers by name: `build_optimizer(cfg.optim, named_params, lr)` -> torch.optim.Optimizer.

A new optimizer is one file plus `@register("name")` on a builder `(cfg, named_params, lr) -> Optimizer`,
named_params a list of (qualified name, parameter). Low-rank optimizers (galore, dct, frugal) get two
param groups: {"lowrank": True} for 2-D weights and {"lowrank": False} (plain AdamW) for the rest and for
`optim.full_rank_modules` (embeddings, lm_head by default, as GaLore does). LoRA+ (optim.lora_plus_ratio)
then moves lora_B into groups of their own with "lr_scale": ratio, which `set_lr` honours.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from slimtune.errors import SlimtuneError
from slimtune.registry import OPTIMIZERS  # name -> builder (cfg, params, lr) -> Optimizer

register = OPTIMIZERS.register


def build_optimizer(cfg, named_params, lr: float) -> torch.optim.Optimizer:
    """cfg: OptimConfig; named_params: (name, parameter) pairs of the trainable fp32 master weights."""
    build = OPTIMIZERS.get(cfg.name)
    named = [x if isinstance(x, tuple) else (f"param{i}", x) for i, x in enumerate(named_params)]
    if not named:
        raise SlimtuneError("no trainable parameters: check adapter.type and adapter.target_modules")
    if cfg.in_backward:
        from slimtune.optim.in_backward import OptimizerInBackward

        index = {id(p): i for i, (_, p) in enumerate(named)}

        def make(params):  # one optimizer per parameter; a per-parameter seed keeps random subspaces distinct
            own = dataclasses.replace(cfg, seed=cfg.seed * 1_000_003 + index[id(params[0])])
            return lora_plus(build(own, _names_of(named, params), lr), named, cfg.lora_plus_ratio, lr)

        return OptimizerInBackward([p for _, p in named], make)
    return lora_plus(build(cfg, named, lr), named, cfg.lora_plus_ratio, lr)


def lora_plus(optimizer, named, ratio: float, lr: float):
    """LoRA+ (Hayou et al. 2024) grouped as PEFT's create_loraplus_optimizer does: lora_B factors and 1-D
    parameters (DoRA's magnitude) go to a copy of their param group whose lr is ratio x the schedule's
    ("lr_scale"); every other group gets lr_scale 1. ratio 0: off, the optimizer is returned unchanged."""
    if not ratio:
        return optimizer
    fast = {id(p) for n, p in named if "lora_B" in n or p.dim() == 1}
    for group in list(optimizer.param_groups):
        group["lr_scale"] = 1.0
        moved = [p for p in group["params"] if id(p) in fast]
        if len(moved) == len(group["params"]):  # nothing to split (in_backward: one parameter per group)
            group["lr_scale"] = ratio if moved else 1.0
            continue
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in fast]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                       "lr_scale": ratio})
    set_lr(optimizer, lr)
    return optimizer


def set_lr(optimizer, lr: float) -> None:
    """The schedule's lr on every param group, times the group's "lr_scale" (LoRA+'s lora_B groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _names_of(named, params):
    ids = {id(p) for p in params}
    return [(n, p) for n, p in named if id(p) in ids]


def lowrank_groups(cfg, named) -> list[dict]:
    """[{"params": 2-D weights, "lowrank": True}, {"params": the rest, "lowrank": False}] (empty ones dropped)."""
    low, plain = [], []
    for name, p in named:
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        (low if p.dim() == 2 and module not in cfg.full_rank_modules else plain).append(p)
    return [g for g in ({"params": low, "lowrank": True}, {"params": plain, "lowrank": False}) if g["params"]]


def _adam_kwargs(cfg) -> dict:
    return {"betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}


@register("adamw")
def _adamw(cfg, named, lr):
    params = [p for _, p in named]
    if cfg.state_bits == 8:
        from slimtune.optim.adamw import AdamW

        return AdamW(params, lr=lr, state_bits=8, **_adam_kwargs(cfg))
    # foreach=False keeps one parameter's temporaries alive at a time (lower peak memory on CPU)
    return torch.optim.AdamW(params, lr=lr, foreach=False, **_adam_kwargs(cfg))


@register("adamw8bit")
def _adamw8bit(cfg, named, lr):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SlimtuneError("optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes "
                            "(or optim.name=adamw optim.state_bits=8, slimtune's own 8-bit states)") from None
    return bnb.optim.AdamW8bit([p for _, p in named], lr=lr, **_adam_kwargs(cfg))


@register("sgd")
def _sgd(cfg, named, lr):
    return torch.optim.SGD([p for _, p in named], lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _projected(cls_path: str):
    def build(cfg, named, lr):
        module, cls = cls_path.rsplit(".", 1)
        optimizer_cls = getattr(importlib.import_module(module), cls)
        return optimizer_cls(lowrank_groups(cfg, named), lr=lr, rank=cfg.rank, update_gap=cfg.update_gap,
                             scale=cfg.scale, proj_type=cfg.proj_type, state_bits=cfg.state_bits,
                             proj_dtype=cfg.proj_dtype, **_adam_kwargs(cfg))

    return build


register("galore")(_projected("slimtune.optim.galore.GaLoreAdamW"))
register("dct")(_projected("slimtune.optim.dct.DCTAdamW"))


@register("frugal")
def _frugal(cfg, named, lr):
    from slimtune.optim.frugal import FRUGAL

    return FRUGAL(lowrank_groups(cfg, named), lr=lr, density=cfg.density, subspace=cfg.subspace,
                  update_gap=cfg.update_gap, inactive_lr_scale=cfg.inactive_lr_scale, state_bits=cfg.state_bits,
                  seed=cfg.seed, proj_dtype=cfg.proj_dtype, **_adam_kwargs(cfg))
