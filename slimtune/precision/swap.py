"""`train.precision`: swap the model's linear layers for low-precision training linears.

fp8 / halo -> `FP8Linear` (fp8.py), mxfp4 -> `QuartetLinear` (quartet.py), each registered in
PRECISIONS as `swap(linear, train_cfg) -> module`. Every nn.Linear is swapped except the output head (the
loss computes it, chunked, in full precision) and the modules the caller skips (an adapter's own factors).
The new modules share the old ones' Parameters, so state_dict keys, optimizers, LoRA wrapping and merging
are unchanged; inside a LoRA wrapper the base path computes in low precision, the factors do not.
"""

from __future__ import annotations

import torch.nn as nn

from slimtune.precision.fp8 import FP8Linear, TrainingLinear
from slimtune.precision.quartet import QuartetLinear
from slimtune.registry import PRECISIONS


def largest_block(dim: int, block: int) -> int:
    """The largest power of two <= block that divides dim (1 when dim is odd)."""
    return min(block, dim & -dim)


@PRECISIONS.register("fp8")
def _fp8(linear: nn.Linear, t) -> nn.Module:
    return FP8Linear.from_linear(linear)


@PRECISIONS.register("halo")
def _halo(linear: nn.Linear, t) -> nn.Module:
    # rotations along K need a block dividing in_features, level 2's along tokens are padded
    return FP8Linear.from_linear(linear, t.halo_level, max(2, largest_block(linear.in_features, t.hadamard_block)))


@PRECISIONS.register("mxfp4")
def _mxfp4(linear: nn.Linear, t) -> nn.Module:
    return QuartetLinear.from_linear(linear)


def apply_precision(model: nn.Module, t, skip: frozenset = frozenset()) -> int:
    """Swap in place per t (TrainConfig: precision, halo_level, hadamard_block); returns how many linears
    were swapped (0 for precision='default'). `skip`: ids of modules to leave alone."""
    if t.precision == "default":
        return 0
    swap = PRECISIONS.get(t.precision)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = skip | {id(m) for m in head.modules()} if head is not None else skip  # a LoRA-wrapped head too
    swaps = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear and id(mod) not in skip]
    for name, mod in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, swap(mod, t))
    return len(swaps)


def low_precision_linears(model: nn.Module) -> int:
    """How many of the model's modules are fp8 / HALO / MXFP4 training linears (report.json)."""
    return sum(isinstance(m, TrainingLinear) for m in model.modules())
