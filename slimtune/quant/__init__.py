"""Frozen quantized bases: `quantize_model(model, method, backend)` swaps every nn.Linear (but lm_head).

slimtune's own formats are pure torch (nf4.py, int8.py, and the bit-packed low-bit formats of packed.py:
methods nf2, nf3, int2..int7, int2a..int8a); `backend="bitsandbytes"` uses bnb's layers (bnb.py).
bitsandbytes is never imported unless that backend is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtune.quant.int8 import Int8Linear, Int8Weight, quantize_int8
from slimtune.quant.nf4 import NF4_CODEBOOK, NF4Linear, NF4Weight, quantize_nf4
from slimtune.quant.nfk import nf_codebook
from slimtune.quant.packed import (
    PackedLinear,
    PackedWeight,
    QuantFormat,
    bits_per_param,
)
from slimtune.quant.packed import quantize as quantize_packed
from slimtune.quant.packing import pack_bits, unpack_bits

__all__ = [
    "NF4_CODEBOOK",
    "PACKED_METHODS",
    "QUANT_LINEARS",
    "Int8Linear",
    "Int8Weight",
    "NF4Linear",
    "NF4Weight",
    "PackedLinear",
    "PackedWeight",
    "QuantFormat",
    "bits_per_param",
    "dequantize_weight",
    "is_quantized_linear",
    "nf_codebook",
    "pack_bits",
    "quantize_int8",
    "quantize_model",
    "quantize_nf4",
    "quantize_packed",
    "unpack_bits",
]

# slimtune methods served by PackedLinear ("int8" and "nf4" keep their own Int8Linear / NF4Linear)
PACKED_METHODS = ("nf2", "nf3", *(f"int{k}" for k in range(2, 8)), *(f"int{k}a" for k in range(2, 9)))


def _nf4(linear, block_size, double_quant, compute_dtype):
    return NF4Linear.from_linear(linear, block_size=block_size, double_quant=double_quant, compute_dtype=compute_dtype)


def _int8(linear, block_size, double_quant, compute_dtype):  # double_quant: nf4 only
    return Int8Linear.from_linear(linear, block_size=block_size, compute_dtype=compute_dtype)


def _packed(method):
    def make(linear, block_size, double_quant, compute_dtype):
        fmt = QuantFormat.parse(method, block_size=block_size, double_quant=double_quant)
        return PackedLinear.from_linear(linear, fmt, compute_dtype)

    return make


def _bnb(method):
    def make(linear, block_size, double_quant, compute_dtype):
        from slimtune.quant.bnb import to_bnb_linear

        return to_bnb_linear(linear, method, block_size, double_quant, compute_dtype)

    return make


# (backend, method) -> make(linear, block_size, double_quant, compute_dtype) -> frozen quantized module
QUANT_LINEARS: dict[tuple[str, str], Callable[..., nn.Module]] = {
    ("slimtune", "nf4"): _nf4,
    ("slimtune", "int8"): _int8,
    ("bitsandbytes", "nf4"): _bnb("nf4"),
    ("bitsandbytes", "int8"): _bnb("int8"),
    **{("slimtune", m): _packed(m) for m in PACKED_METHODS},
}


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, backend: str = "slimtune", block_size: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = torch.float32,
                   skip_modules=("lm_head",)) -> int:
    """Replace, in place, every nn.Linear of `model` whose last name component is not in skip_modules by
    its quantized version; returns how many were replaced. method "none" is a no-op (returns 0).

    Only exact nn.Linear is replaced: subclasses (bnb layers, MultiheadAttention's out_proj, whose
    weight the parent reads directly) are left alone. A linear reachable under two names is quantized
    once and stays shared. The original weight is released from the replaced module (a tied copy used
    elsewhere, e.g. an embedding, is untouched), so its memory is freed once the model drops it.
    """
    if method == "none":
        return 0
    if (backend, method) not in QUANT_LINEARS:
        valid = ", ".join(f"backend={b} method={m}" for b, m in QUANT_LINEARS)
        raise ValueError(f"unknown quantization backend={backend!r} method={method!r}; valid: {valid} "
                         f"(or method='none')")
    make = QUANT_LINEARS[(backend, method)]
    skip = {skip_modules} if isinstance(skip_modules, str) else set(skip_modules)
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip]
    if any(name == "" for name, _ in targets):
        raise ValueError("quantize_model replaces submodules in place; the model itself is an nn.Linear "
                         "(wrap it in a container)")
    done: dict[int, nn.Module] = {}
    for name, old in targets:
        new = done.get(id(old))
        if new is None:
            new = done[id(old)] = make(old, block_size, double_quant, compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    for _, old in targets:  # drop the full-precision weights now (one layer at a time was the peak)
        old.weight = None
    return len(done)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for slimtune NF4Linear / Int8Linear / PackedLinear and bitsandbytes Linear4bit / Linear8bitLt."""
    if isinstance(module, (NF4Linear, Int8Linear, PackedLinear)):
        return True
    from slimtune.quant.bnb import is_bnb_linear  # does not import bitsandbytes itself

    return is_bnb_linear(module)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """fp32 (out_features, in_features) weight of any quantized linear (see is_quantized_linear)."""
    if isinstance(module, (NF4Linear, Int8Linear, PackedLinear)):
        return module.dequantize_weight(torch.float32)
    from slimtune.quant.bnb import dequantize_bnb_weight, is_bnb_linear

    if not is_bnb_linear(module):
        raise TypeError(f"{type(module).__name__} is not a quantized linear")
    return dequantize_bnb_weight(module)
