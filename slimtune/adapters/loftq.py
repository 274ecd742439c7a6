"""LoftQ (Li et al. 2023) initialisation of LoRA on a uniformly quantized base (`adapter.init=loftq`).

Instead of B = 0 on top of quant(W), alternate Q = quant(W - L) and L = SVD_r(W - Q), starting from
Q = quant(W) (lq_lora.decompose with start="quantize"), and keep the best iterate: the model at step 0
is then closer to the full-precision one than plain QLoRA. The format is the fixed quant.method.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

from slimtune.adapters.lora import LoRALinear
from slimtune.adapters.lq_lora import check_rank, decompose, install, target_linears


def base_quantizer(quant_cfg) -> tuple[Callable, Callable]:
    """(quantize(w) -> packed holder, make(holder, bias, compute_dtype) -> frozen quantized linear) for a
    slimtune quant.method (nf4 / int8 / the packed NF-k and INT-k formats)."""
    from slimtune.quant import Int8Linear, NF4Linear, PackedLinear, QuantFormat, quantize_int8, quantize_nf4
    from slimtune.quant import quantize_packed

    method, bs, dq = quant_cfg.method, quant_cfg.block_size, quant_cfg.double_quant
    if method == "nf4":
        def quantize(w):
            return quantize_nf4(w, bs, dq)

        def build(h, device):
            return NF4Linear(h.shape[1], h.shape[0], bias=False, block_size=bs, double_quant=dq, device=device)
    elif method == "int8":
        def quantize(w):
            return quantize_int8(w, bs)

        def build(h, device):
            return Int8Linear(h.shape[1], h.shape[0], bias=False, block_size=bs, device=device)
    else:
        fmt = QuantFormat.parse(method, block_size=bs, double_quant=dq)

        def quantize(w):
            return quantize_packed(w, fmt)

        def build(h, device):
            return PackedLinear(h.shape[1], h.shape[0], bias=False, fmt=fmt, device=device)

    def make(holder, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
        m = build(holder, holder.codes.device)
        m.compute_dtype = compute_dtype
        m._set_packed(holder)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        return m

    return quantize, make


def apply_loftq(model: nn.Module, cfg, samples=None, compute_dtype: torch.dtype = torch.float32,
                log: Callable[[str], None] = print) -> dict:
    """Quantize every targeted nn.Linear of `model` in place at cfg.quant.method and wrap it with LoRA
    initialised by LoftQ (lq_lora.max_iters alternations). Returns per-matrix errors and seconds."""
    t0 = time.perf_counter()
    quantize, make = base_quantizer(cfg.quant)
    names = target_linears(model, cfg.adapter.target_modules)
    check_rank(model, names, cfg.adapter.rank)
    modules = {}
    for name in names:
        old = model.get_submodule(name)
        d = decompose(old.weight, quantize, cfg.adapter.rank, cfg.lq_lora.max_iters, start="quantize", guard=False)
        install(model, name, make(d.packed, old.bias, compute_dtype), d.L1, d.L2, cfg.adapter, LoRALinear)
        modules[name] = {"error": d.error, "error_quant_only": d.history[0] if d.history else None,
                         "iterations": len(d.history)}
    log(f"loftq: initialised {len(names)} LoRA adapters on {cfg.quant.method} in {time.perf_counter() - t0:.1f}s")
    return {"modules": modules, "seconds": time.perf_counter() - t0}
