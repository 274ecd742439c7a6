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

from slimtune.adapters.inject import check_rank, target_names
from slimtune.adapters.lora import LoRALinear
from slimtune.adapters.lowrank_setup import LowRankSetup
from slimtune.adapters.lq_lora import decompose, install
from slimtune.adapters.lq_lora import validate_lq_lora
from slimtune.technique import declares
from slimtune.registry import ADAPTER_INITS, QUANT_FORMATS


def base_module(quant_cfg, linear: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """An empty frozen quantized linear of `linear`'s shape in the slimtune format quant_cfg.method (its
    `quantize_weight(w)` / `set_weight(holder)` do the rest), with `linear`'s bias."""
    cls = QUANT_FORMATS.get(quant_cfg.method)
    fmt = cls.format_for(quant_cfg.method, quant_cfg.block_size, quant_cfg.double_quant)
    m = cls.make(fmt, linear.in_features, linear.out_features, False, compute_dtype, linear.weight.device)
    m.set_bias(linear.bias)
    return m


def targets(model: nn.Module, setup: LowRankSetup) -> list[str]:
    """The plain nn.Linear layers adapter.target_modules selects, rank-checked."""
    names = target_names(model, setup.target_modules, plain_only=True)
    check_rank(model, names, setup.lora.rank)
    return names


@ADAPTER_INITS.register("loftq")
@declares(
    requires={"quantized_base", "plain_lora", "slimtune_format", "undecomposed_base"},
    withholds={"exact_zero", "streamable"},
    validate=lambda cfg: validate_lq_lora(cfg.lq_lora),
)
def apply_loftq(
    model: nn.Module,
    setup: LowRankSetup,
    calibration=None,
    compute_dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> dict:
    """Quantize every targeted nn.Linear of `model` in place at quant.method and wrap it with LoRA
    initialised by LoftQ (lq_lora.max_iters alternations); needs no calibration data. Returns per-matrix
    errors and seconds."""
    t0 = time.perf_counter()
    modules = {}
    names = targets(model, setup)
    for name in names:
        old = model.get_submodule(name)
        base = base_module(setup.quant, old, compute_dtype)
        d = decompose(
            old.weight, base.quantize_weight, setup.lora.rank, setup.lq_lora.max_iters, start="quantize", guard=False
        )
        base.set_weight(d.packed)
        install(model, name, base, d.L1, d.L2, setup.lora, LoRALinear)
        modules[name] = {
            "error": d.error,
            "error_quant_only": d.history[0] if d.history else None,
            "iterations": len(d.history),
        }
    log(f"loftq: initialised {len(names)} LoRA adapters on {setup.quant.method} in {time.perf_counter() - t0:.1f}s")
    return {"modules": modules, "seconds": time.perf_counter() - t0}
