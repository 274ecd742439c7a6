"""Optimizers by name: `build_optimizer(cfg.optim, params, lr)` -> torch.optim.Optimizer.

A new optimizer is one file plus `@register("name")` on a builder `(cfg, params, lr) -> Optimizer`.
"""

from __future__ import annotations

import torch

from slimtune.errors import SlimtuneError
from slimtune.registry import Registry

OPTIMIZERS = Registry("optim.name")  # name -> builder (cfg, params, lr) -> Optimizer
register = OPTIMIZERS.register


def build_optimizer(cfg, params, lr: float) -> torch.optim.Optimizer:
    """cfg: OptimConfig; params: the trainable parameters (fp32 master weights)."""
    build = OPTIMIZERS.get(cfg.name)
    params = list(params)
    if not params:
        raise SlimtuneError("no trainable parameters: check adapter.type and adapter.target_modules")
    return build(cfg, params, lr)


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
