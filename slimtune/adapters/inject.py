"""Putting adapters into a model: an ordered dispatch table of the module types they can wrap, target
selection (`adapter.target_modules`), and `apply_adapters(model, cfg.adapter)` through the ADAPTERS registry.

`adapter.type=none` (full fine-tuning) is the same stage with nothing wrapped: every parameter trains, as
fp32 master weights (bf16 compute comes from autocast).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.quant import is_quantized_linear
from slimtune.registry import ADAPTERS, SECTIONS
from slimtune.technique import declares

# (predicate, what it is): most specific first, first match wins. Quantized linears come before
# nn.Linear because bnb's Linear4bit/Linear8bitLt subclass nn.Linear.
DISPATCH: list[tuple[Callable[[nn.Module], bool], str]] = [
    (is_quantized_linear, "quantized linear (slimtune formats, bitsandbytes)"),
    (lambda m: isinstance(m, nn.Linear), "nn.Linear"),
]

NEVER_ALL_LINEAR = ("lm_head",)  # PEFT's all-linear also leaves the output head alone


def linear_kind(module: nn.Module) -> str | None:
    for predicate, kind in DISPATCH:
        if predicate(module):
            return kind
    return None


def target_names(model: nn.Module, target_modules, plain_only: bool = False) -> list[str]:
    """Qualified names of the modules `adapter.target_modules` selects: the names listed (a last-component
    or full-name match), or every linear but lm_head for "all-linear". plain_only: exact nn.Linear only (a
    low-rank decomposition needs the full-precision weight)."""

    def wrappable(m):
        return type(m) is nn.Linear if plain_only else linear_kind(m) is not None

    names = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear":
            if wrappable(module) and last not in NEVER_ALL_LINEAR:
                names.append(name)
        elif last in target_modules or name in target_modules:
            if not wrappable(module):
                kinds = "nn.Linear" if plain_only else ", ".join(k for _, k in DISPATCH)
                raise SlimtuneError(
                    f"adapter.target_modules: '{name}' is a {type(module).__name__}, which this "
                    f"adapter cannot wrap; supported: {kinds}"
                )
            names.append(name)
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if wrappable(m)})
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise ConfigError(f"adapter.target_modules={shown} matches no linear module; available: {', '.join(available)}")
    return names


def check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    for n in names:
        m = model.get_submodule(n)
        if rank > min(m.in_features, m.out_features):
            raise ConfigError(
                f"lora.rank={rank} exceeds min(in, out)={min(m.in_features, m.out_features)} of {n}; use a smaller rank"
            )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return new


def apply_adapters(model: nn.Module, cfg, options=None, master: torch.dtype = torch.float32) -> list[str]:
    """Freeze `model` and wrap the modules `cfg.target_modules` names with adapter `cfg.type`; for
    type "none" unfreeze everything instead (master weights in `master`: optim.master_dtype). Returns the
    qualified names wrapped. cfg: AdapterConfig (type, target_modules, init); options: the adapter's own
    section (lora.*, sparse_ft.*; None: its defaults)."""
    if cfg.type == "none":
        for p in model.parameters():
            p.data = p.data.to(master)
            p.requires_grad_(True)
        return []
    adapter_cls = ADAPTERS.get(cfg.type)
    if options is None and adapter_cls.section is not None:
        options = SECTIONS[adapter_cls.section]()
    for p in model.parameters():
        p.requires_grad_(False)
    names = target_names(model, cfg.target_modules)
    options = adapter_cls.configure(model, names, options)
    for name in names:
        module = adapter_cls.from_config(model.get_submodule(name), options, name=name, init=cfg.init)
        replace_module(model, name, module)
    return names


@declares(requires={"trainable_base"}, withholds={"lora_factors", "plain_lora"})
class FullFineTuning:
    """adapter.type=none: every weight trains (fp32 masters)."""


ADAPTERS.declare("none", FullFineTuning)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> adapter module, for every adapter in `model`."""
    types = tuple(ADAPTERS.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def adapter_internals(model: nn.Module) -> frozenset:
    """ids of the modules inside adapters that are not their base (LoRA's lora_A / lora_B ...): what a
    stage that rewrites the model's linears (train.precision) must leave alone."""
    inside = set()
    for m in adapter_modules(model).values():
        base = {id(x) for x in m.base.modules()}
        inside.update(id(x) for x in m.modules() if x is not m and id(x) not in base)
    return frozenset(inside)


def unwrap_adapters(model: nn.Module) -> None:
    """Replace each adapter by its base module (after merge(), this is PEFT's merge_and_unload)."""
    for name, module in list(adapter_modules(model).items()):
        replace_module(model, name, module.base)
