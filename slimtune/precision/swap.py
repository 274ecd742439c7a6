"""`train.precision`: swap the model's linear layers for low-precision training linears.

fp8 / halo -> `FP8Linear` (fp8.py), mxfp4 -> `QuartetLinear` (quartet.py), each registered in PRECISIONS by
its file as a technique with `swap(linear, options) -> module` (options: its own section, halo.*). Every
nn.Linear is swapped except the output head (the loss computes it, chunked, in full precision) and the modules
the caller skips (an adapter's own factors). The new modules share the old ones' Parameters, so state_dict
keys, optimizers, LoRA wrapping and merging are unchanged; inside a LoRA wrapper the base path computes in low
precision, the factors do not.
"""

from __future__ import annotations

import torch.nn as nn

from slimtune.precision.fp8 import TrainingLinear
from slimtune.registry import PRECISIONS


def apply_precision(model: nn.Module, precision: str, options=None, skip: frozenset = frozenset()) -> int:
    """Swap in place for train.precision=`precision` (options: its own section, e.g. halo.*); returns how many
    linears were swapped (0 for precision='default'). `skip`: ids of modules to leave alone."""
    if precision == "default":
        return 0
    technique = PRECISIONS.get(precision)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = skip | {id(m) for m in head.modules()} if head is not None else skip  # a LoRA-wrapped head too
    swaps = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear and id(mod) not in skip]
    for name, mod in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, technique.swap(mod, options))
    return len(swaps)


def low_precision_linears(model: nn.Module) -> int:
    """How many of the model's modules are fp8 / HALO / MXFP4 training linears (report.json)."""
    return sum(isinstance(m, TrainingLinear) for m in model.modules())
