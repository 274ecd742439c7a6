"""The bitsandbytes backend: its Linear4bit (nf4) and Linear8bitLt (int8) as the frozen base.

bitsandbytes >= 0.45 quantizes and runs these on CPU too; it is imported lazily so slimtune works
without it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("quant.backend=bitsandbytes needs bitsandbytes: pip install bitsandbytes") from None
    return bnb


def to_bnb_linear(linear: nn.Linear, method: str, block_size: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight, quantized now on linear's device."""
    bnb = _bnb()
    device = linear.weight.device
    bias = linear.bias is not None
    if method == "nf4":
        m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4", device="meta")
        m.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4",
                                     blocksize=block_size, compress_statistics=double_quant)
    elif method == "int8":
        m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                device="meta")
        m.weight = bnb.nn.Int8Params(linear.weight.data.to(torch.float16), requires_grad=False,
                                     has_fp16_weights=False)
    else:
        raise ValueError(f"bitsandbytes backend supports nf4 and int8, not {method!r}")
    if bias:
        m.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return m.to(device)  # moving an unquantized bnb param to a device quantizes it


def is_bnb_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantize_bnb_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) fp32 weight of a bnb Linear4bit / Linear8bitLt."""
    bnb = _bnb()
    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = getattr(w, "SCB", None) if getattr(w, "SCB", None) is not None else module.state.SCB
    return (w.data.float() * scb.float()[:, None] / 127).float()
