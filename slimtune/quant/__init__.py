"""Frozen quantized bases: `quantize_model(model, method, backend)` swaps every nn.Linear (but lm_head).

slimtune's own formats are pure torch (nf4.py, int8.py, and the bit-packed low-bit formats of packed.py:
methods nf2, nf3, int2..int7, int2a..int8a; llama.cpp's q8_0, q4_0, q4_1, q5_0, q5_1 in ggml.py), each
registered in QUANT_FORMATS by its file;
`backend="bitsandbytes"` uses bnb's layers (bnb.py).
bitsandbytes is never imported unless that backend is asked for.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.quant.bnb import dequantize_bnb_weight, is_bnb_linear, to_bnb_linear  # never imports bnb itself
from slimtune.quant.ggml import GGML_TYPES, GGMLLinear, GGMLWeight, quantize_ggml
from slimtune.quant.int8 import Int8Linear, Int8Weight, quantize_int8
from slimtune.quant.linear import FrozenQuantLinear, configured_format
from slimtune.quant.nf4 import NF4_CODEBOOK, NF4Linear, NF4Weight, quantize_nf4
from slimtune.quant.nfk import nf_codebook
from slimtune.quant.packed import PACKED_METHODS, PackedLinear, PackedWeight, bits_per_param
from slimtune.quant.qformat import QuantFormat
from slimtune.registry import BACKENDS, QUANT_FORMATS
from slimtune.technique import Technique
from slimtune.quant.packed import quantize as quantize_packed
from slimtune.quant.packing import pack_bits, unpack_bits

__all__ = [
    "GGML_TYPES",
    "GGMLLinear",
    "GGMLWeight",
    "quantize_ggml",
    "NF4_CODEBOOK",
    "PACKED_METHODS",
    "QUANT_FORMATS",
    "FrozenQuantLinear",
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


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    backend: str = "slimtune",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.float32,
    skip_modules=("lm_head",),
    options=None,
) -> int:
    """Replace, in place, every nn.Linear of `model` whose last name component is not in skip_modules by
    its quantized version; returns how many were replaced. method "none" is a no-op (returns 0).

    Only exact nn.Linear is replaced: subclasses (bnb layers, MultiheadAttention's out_proj, whose
    weight the parent reads directly) are left alone. A linear reachable under two names is quantized
    once and stays shared. The original weight is released from the replaced module (a tied copy used
    elsewhere, e.g. an embedding, is untouched), so its memory is freed once the model drops it.
    """
    if method == "none":
        return 0
    if backend == "bitsandbytes":

        def make(linear):
            return to_bnb_linear(linear, method, block_size, double_quant, compute_dtype)
    elif backend == "slimtune":
        cls = QUANT_FORMATS.get(method)
        fmt = configured_format(cls, method, block_size, double_quant, options)

        def make(linear):
            return cls.quantize_linear(linear, fmt, compute_dtype)
    else:
        raise ValueError(f"unknown quantization backend={backend!r}; use slimtune or bitsandbytes")
    skip = {skip_modules} if isinstance(skip_modules, str) else set(skip_modules)
    targets = [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip
    ]
    if any(name == "" for name, _ in targets):
        raise ValueError(
            "quantize_model replaces submodules in place; the model itself is an nn.Linear (wrap it in a container)"
        )
    done: dict[int, nn.Module] = {}
    for name, old in targets:
        new = done.get(id(old))
        if new is None:
            new = done[id(old)] = make(old)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    for _, old in targets:  # drop the full-precision weights now (one layer at a time was the peak)
        old.weight = None
    return len(done)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for every slimtune format (FrozenQuantLinear subclasses) and bitsandbytes Linear4bit / Linear8bitLt."""
    return isinstance(module, FrozenQuantLinear) or is_bnb_linear(module)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """fp32 (out_features, in_features) weight of any quantized linear (see is_quantized_linear)."""
    if isinstance(module, FrozenQuantLinear):
        return module.dequantize_weight(torch.float32)
    if not is_bnb_linear(module):
        raise TypeError(f"{type(module).__name__} is not a quantized linear")
    return dequantize_bnb_weight(module)


class NoQuant(Technique):
    """quant.method=none: the base stays in full precision."""

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"quantized_base", "lq_lora_base"}


QUANT_FORMATS.declare("none", NoQuant)


@BACKENDS.register("slimtune")
class SlimtuneBackend(Technique):
    """quant.backend=slimtune: slimtune's own pure-torch formats (this package)."""
