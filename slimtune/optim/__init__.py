"""Optimizers by name: `build_optimizer(cfg.optim, named_params, lr, options)` -> torch.optim.Optimizer.

A new optimizer is one file: its options section (`schema.config_section`), and `@OPTIMIZERS.register(name)`
on a builder `(optim, options, named_params, lr) -> Optimizer` (optim: the optim section; options: its own;
named_params: (qualified name, parameter) pairs), declared with `technique.declares` (which options combine
with it, its value rules). Low-rank optimizers (galore, dct, frugal) get two param groups (common.py's
lowrank_groups); LoRA+ (optim.lora_plus_ratio) moves lora_B into groups of their own with an "lr_scale".
"""

from __future__ import annotations

import dataclasses

import torch

from slimtune.errors import SlimtuneError
from slimtune.optim.common import lora_plus, lowrank_groups, set_lr  # noqa: F401  (re-exported)
from slimtune.registry import OPTIMIZERS, SECTIONS
from slimtune.technique import options_of


def optimizer_options(cfg):
    """The chosen optimizer's own section (galore.*, frugal.*, sgd.*, ...) of RecipeConfig `cfg`, or None."""
    return options_of(cfg, OPTIMIZERS.get(cfg.optim.name))


def build_optimizer(optim, named_params, lr: float, options=None) -> torch.optim.Optimizer:
    """optim: the optim section; named_params: (name, parameter) pairs of the trainable fp32 master weights;
    options: the optimizer's own section (galore.*, ...; None: its defaults)."""
    build = OPTIMIZERS.get(optim.name)
    if options is None and getattr(build, "section", None):
        options = SECTIONS[build.section]()
    named = [x if isinstance(x, tuple) else (f"param{i}", x) for i, x in enumerate(named_params)]
    if not named:
        raise SlimtuneError("no trainable parameters: check adapter.type and adapter.target_modules")
    if optim.in_backward:
        from slimtune.optim.in_backward import OptimizerInBackward

        index = {id(p): i for i, (_, p) in enumerate(named)}

        def make(params):  # one optimizer per parameter; a per-parameter seed keeps random subspaces distinct
            own = options
            if options is not None and hasattr(options, "seed"):
                own = dataclasses.replace(options, seed=options.seed * 1_000_003 + index[id(params[0])])
            return lora_plus(build(optim, own, _names_of(named, params), lr), named, optim.lora_plus_ratio, lr)

        return OptimizerInBackward([p for _, p in named], make)
    return lora_plus(build(optim, options, named, lr), named, optim.lora_plus_ratio, lr)


def _names_of(named, params):
    ids = {id(p) for p in params}
    return [(n, p) for n, p in named if id(p) in ids]


from slimtune.optim import adamw, cram, dct, frugal, galore, in_backward, master, sgd, states8bit  # noqa: E402,F401
