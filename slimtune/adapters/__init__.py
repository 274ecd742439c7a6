"""Adapters: a registry by name and an ordered dispatch table of the module types they can wrap.

`apply_adapters(model, cfg.adapter)` freezes the model, then replaces every targeted module with the
registered adapter wrapping it. A new adapter is one file plus `@register("name")`.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.registry import Registry

# name -> adapter class offering `from_config(module, adapter_cfg)`
ADAPTERS = Registry("adapter.type")
register = ADAPTERS.register


def _is_quantized(m: nn.Module) -> bool:
    from slimtune.quant import is_quantized_linear

    return is_quantized_linear(m)


# (predicate, what it is): most specific first, first match wins. Quantized linears come before
# nn.Linear because bnb's Linear4bit/Linear8bitLt subclass nn.Linear.
DISPATCH: list[tuple[Callable[[nn.Module], bool], str]] = [
    (_is_quantized, "quantized linear (slimtune nf4/int8, bitsandbytes)"),
    (lambda m: isinstance(m, nn.Linear), "nn.Linear"),
]

NEVER_ALL_LINEAR = ("lm_head",)  # PEFT's all-linear also leaves the output head alone


def linear_kind(module: nn.Module) -> str | None:
    for predicate, kind in DISPATCH:
        if predicate(module):
            return kind
    return None


def _targets(model: nn.Module, target_modules) -> list[str]:
    names = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear":
            if linear_kind(module) and last not in NEVER_ALL_LINEAR:
                names.append(name)
        elif last in target_modules or name in target_modules:
            if linear_kind(module) is None:
                raise SlimtuneError(f"adapter.target_modules: '{name}' is a {type(module).__name__}, which no "
                                    f"adapter can wrap; supported: {', '.join(k for _, k in DISPATCH)}")
            names.append(name)
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_kind(m)})
        raise ConfigError(f"adapter.target_modules={list(target_modules) if not isinstance(target_modules, str) else target_modules} "
                          f"matches no linear module; available: {', '.join(available)}")
    return names


def apply_adapters(model: nn.Module, cfg) -> list[str]:
    """Freeze `model` and wrap the modules `cfg.target_modules` names with adapter `cfg.type`.

    Returns the qualified names wrapped. cfg: AdapterConfig.
    """
    adapter_cls = ADAPTERS.get(cfg.type)
    for p in model.parameters():
        p.requires_grad_(False)
    names = _targets(model, cfg.target_modules)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        try:
            setattr(parent, child, adapter_cls.from_config(getattr(parent, child), cfg))
        except ValueError as e:
            raise ConfigError(f"adapter.rank={cfg.rank}: {e} (module {name})") from None
    return names


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> adapter module, for every adapter in `model`."""
    types = tuple(ADAPTERS.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def unwrap_adapters(model: nn.Module) -> None:
    """Replace each adapter by its base module (after merge(), this is PEFT's merge_and_unload)."""
    for name, module in list(adapter_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.base)


from slimtune.adapters import lora, lq_lora  # noqa: E402,F401  (fills the registry)
