"""Optimizers by name: `build_optimizer(cfg.optim, named_params, lr)` -> torch.optim.Optimizer.

A new optimizer is one file plus `@register("name")` on a builder `(cfg, named_params, lr) -> Optimizer`,
named_params a list of (qualified name, parameter). Low-rank optimizers (galore, dct, frugal) get two
param groups: {"lowrank": True} for 2-D weights and {"lowrank": False} (plain AdamW) for the rest and for
`optim.full_rank_modules` (embeddings, lm_head by default, as GaLore does).
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
            return build(own, _names_of(named, params), lr)

        return OptimizerInBackward([p for _, p in named], make)
    return build(cfg, named, lr)


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
