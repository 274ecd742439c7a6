"""Frozen quantized bases: `quantize_model(model, method, backend)` swaps every nn.Linear (but lm_head).

slimtune's own formats are pure torch (nf4.py, int8.py, sharing linear.py); `backend="bitsandbytes"`
uses bnb's layers (bnb.py). bitsandbytes is never imported unless asked for.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from slimtune.quant.int8 import Int8Linear
from slimtune.quant.linear import QuantizedLinear
from slimtune.quant.nf4 import NF4Linear


def _slimtune(cls):
    def make(linear, block_size, double_quant, compute_dtype):
        kw = {"double_quant": double_quant} if cls is NF4Linear else {}
        return cls.from_linear(linear, compute_dtype=compute_dtype, block_size=block_size, **kw)

    return make


def _bnb(method):
    def make(linear, block_size, double_quant, compute_dtype):
        from slimtune.quant.bnb import to_bnb_linear

        return to_bnb_linear(linear, method, block_size, double_quant, compute_dtype)

    return make


QUANT_LINEARS: dict[tuple[str, str], Callable] = {
    ("slimtune", "nf4"): _slimtune(NF4Linear),
    ("slimtune", "int8"): _slimtune(Int8Linear),
    ("bitsandbytes", "nf4"): _bnb("nf4"),
    ("bitsandbytes", "int8"): _bnb("int8"),
}


def quantize_model(model: nn.Module, method: str, backend: str = "slimtune", block_size: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                   skip_modules=("lm_head",)) -> int:
    """Replace every nn.Linear (last name not in skip_modules) in place; returns how many."""
    if method == "none":
        return 0
    if (backend, method) not in QUANT_LINEARS:
        valid = ", ".join(f"{b}/{m}" for b, m in QUANT_LINEARS)
        raise ValueError(f"unknown quantization {backend}/{method}; valid: {valid}")
    make = QUANT_LINEARS[(backend, method)]
    targets = [n for n, m in model.named_modules()
               if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip_modules]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child), block_size, double_quant, compute_dtype))
    return len(targets)


def is_quantized_linear(module: nn.Module) -> bool:
    if isinstance(module, QuantizedLinear):
        return True
    from slimtune.quant.bnb import is_bnb_linear

    return is_bnb_linear(module)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) fp32 weight of any quantized linear."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize_weight(torch.float32)
    from slimtune.quant.bnb import dequantize_bnb_weight

    return dequantize_bnb_weight(module)
