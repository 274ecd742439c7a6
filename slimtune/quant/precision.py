"""`train.precision`: swap the model's linear layers for low-precision training linears.

fp8 / halo -> `FP8Linear` (fp8_linear.py), mxfp4 -> `QuartetLinear` (quartet.py). Every nn.Linear is
swapped except the output head (the loss computes it, chunked, in full precision). The new modules share
the old ones' Parameters, so state_dict keys, optimizers, LoRA wrapping and merging are unchanged.
Call it before adapters are applied: LoRA then wraps the low-precision linear as its base path.
"""

from __future__ import annotations

import torch.nn as nn

from slimtune.quant.fp8_linear import FP8Linear, TrainingLinear
from slimtune.quant.quartet import QuartetLinear

PRECISIONS = ("default", "fp8", "halo", "mxfp4")


def largest_block(dim: int, block: int) -> int:
    """The largest power of two <= block that divides dim (1 when dim is odd)."""
    return min(block, dim & -dim)


def _swap(linear: nn.Linear, precision: str, halo_level: int, block: int) -> nn.Linear:
    if precision == "fp8":
        return FP8Linear.from_linear(linear)
    if precision == "halo":
        # rotations along K need a block dividing in_features, level 2's along tokens are padded
        return FP8Linear.from_linear(linear, halo_level, max(2, largest_block(linear.in_features, block)))
    return QuartetLinear.from_linear(linear)


def apply_precision(model: nn.Module, precision: str, halo_level: int = 2, block: int = 128) -> int:
    """Swap in place; returns how many linears were swapped (0 for precision='default')."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "default":
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps = [(name, mod) for name, mod in model.named_modules()
             if type(mod) is nn.Linear and mod is not head]
    for name, mod in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _swap(mod, precision, halo_level, block))
    return len(swaps)


def low_precision_linears(model: nn.Module) -> int:
    """How many of the model's modules are fp8 / HALO / MXFP4 training linears (report.json)."""
    return sum(isinstance(m, TrainingLinear) for m in model.modules())
