"""Optimizers by name: `build_optimizer(cfg.optim, params, lr)` -> torch.optim.Optimizer.

A new optimizer is one file plus `@register("name")` on a builder `(cfg, params, lr) -> Optimizer`.
"""

from __future__ import annotations

from typing import Callable

import torch

from slimtune.errors import ConfigError, SlimtuneError

OPTIMIZERS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        OPTIMIZERS[name] = fn
        return fn

    return deco


def build_optimizer(cfg, params, lr: float) -> torch.optim.Optimizer:
    """cfg: OptimConfig; params: the trainable parameters (fp32 master weights)."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r} is not registered; registered: {', '.join(sorted(OPTIMIZERS))}")
    params = list(params)
    if not params:
        raise SlimtuneError("no trainable parameters: check adapter.type and adapter.target_modules")
    return OPTIMIZERS[cfg.name](cfg, params, lr)


@register("adamw")
def _adamw(cfg, params, lr):
    # foreach=False keeps one parameter's temporaries alive at a time (lower peak memory on CPU)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             foreach=False)


@register("adamw8bit")
def _adamw8bit(cfg, params, lr):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SlimtuneError("optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@register("sgd")
def _sgd(cfg, params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
