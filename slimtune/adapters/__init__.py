"""Adapters: a registry by name (slimtune.registry.ADAPTERS) and the stage that puts them into a model.

`apply_adapters(model, cfg.adapter)` freezes the model, then replaces every targeted module with the
registered adapter wrapping it. A new adapter family is one file plus `@ADAPTERS.register("name")`, imported
here, following the contract in adapters/base.py (and an ADAPTER_FORMATS entry for how it is saved).
LoRA initialisations that start from the full-precision weight (LoftQ, EoRA, PiSSA) register in ADAPTER_INITS.
"""

from slimtune.adapters import dora, eora, loftq, lora, lq_lora, pissa, sparse_ft  # noqa: F401

# (importing them fills the registries ADAPTERS and ADAPTER_INITS; their save formats are in slimtune/formats)
from slimtune.adapters.inject import (  # noqa: F401
    DISPATCH,
    NEVER_ALL_LINEAR,
    adapter_internals,
    adapter_modules,
    apply_adapters,
    check_rank,
    linear_kind,
    replace_module,
    target_names,
    unwrap_adapters,
)
from slimtune.registry import ADAPTER_INITS, ADAPTERS  # noqa: F401
