"""EoRA (Liu et al. 2024) initialisation of LoRA on a quantized base (`adapter.init=eora`).

Compensate the quantization error E = W - Q with the rank-r L minimising the output error on
calibration activations, ||(E - L) X^T||_F, instead of ||E - L||_F. With the input covariance
C = X^T X = V diag(lam) V^T (calibration.py), project E' = E V diag(sqrt(lam)) into the
eigenspace, take its best rank-r approximation U S Vh, and map back: L = U S Vh diag(1/sqrt(lam)) V^T.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

from slimtune.adapters.loftq import base_module, targets
from slimtune.adapters.lora import LoRALinear
from slimtune.adapters.lowrank_setup import LowRankSetup
from slimtune.adapters.lq_lora import install
from slimtune.adapters.lq_lora import validate_lq_lora
from slimtune.technique import declares
from slimtune.registry import ADAPTER_INITS


@torch.no_grad()
def eora_lowrank(
    E: torch.Tensor, cov: torch.Tensor, rank: int, damp: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 (out, r), L2 (r, in)) minimising ||(E - L1 L2) X^T||_F given cov = X^T X (in, in).
    Eigenvalues are floored at damp x the largest, so directions the data never excites stay finite."""
    lam, V = torch.linalg.eigh(cov.double())
    lam = lam.clamp(min=damp * float(lam.max().clamp(min=1e-30)))
    sq = lam.sqrt()
    U, S, Vh = torch.linalg.svd(E.double() @ V * sq, full_matrices=False)
    s = S[:rank].sqrt()
    L1 = U[:, :rank] * s
    L2 = (s[:, None] * Vh[:rank] / sq) @ V.T
    return L1.float().contiguous(), L2.float().contiguous()


@ADAPTER_INITS.register("eora")
@declares(
    requires={"quantized_base", "plain_lora", "slimtune_format", "undecomposed_base"},
    withholds={"exact_zero", "streamable"},
    validate=lambda cfg: validate_lq_lora(cfg.lq_lora),
)
def apply_eora(
    model: nn.Module,
    setup: LowRankSetup,
    calibration,
    compute_dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> dict:
    """Quantize every targeted nn.Linear of `model` in place at quant.method and wrap it with LoRA
    initialised by EoRA from the activations `calibration.input_covariance(model, names)` gives
    (calibration.py)."""
    t0 = time.perf_counter()
    names = targets(model, setup)
    covs = calibration.input_covariance(model, names)
    modules = {}
    for name in names:
        old = model.get_submodule(name)
        W = old.weight.detach().float()
        base = base_module(setup.quant, old, compute_dtype)
        packed = base.quantize_weight(W)
        base.set_weight(packed)
        E = W - packed.dequantize(torch.float32)
        L1, L2 = eora_lowrank(E, covs.pop(name), setup.lora.rank)
        install(model, name, base, L1, L2, setup.lora, LoRALinear)
        modules[name] = {
            "error": float((E - L1 @ L2).double().square().sum()),
            "error_quant_only": float(E.double().square().sum()),
        }
    log(f"eora: initialised {len(names)} LoRA adapters on {setup.quant.method} in {time.perf_counter() - t0:.1f}s")
    return {"modules": modules, "seconds": time.perf_counter() - t0}
