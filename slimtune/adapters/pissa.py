"""PiSSA (Meng et al. 2024) initialisation of LoRA (`adapter.init=pissa`), as PEFT's init_lora_weights="pissa".

With W = U S V^T (fp32, exact SVD) and s the LoRA scaling: A = diag(sqrt(S_r / s)) V_r^T, B = U_r diag(sqrt(S_r / s)),
so s B A is W's best rank-r part, and the base keeps the residual W - s B A: at step 0 the model is unchanged,
and training moves the principal directions.

Plain base: done as each module is wrapped (lora.WRAP_INITS); the initial factors A0, B0 are kept (buffers, not
saved) and the saved adapter is the CONVERTED one, PEFT's `path_initial_model_for_weight_conversion` form: a
plain LoRA of rank 2r relative to the ORIGINAL base, [A; A0] and [B, -B0], alpha doubled (x sqrt 2 with rsLoRA)
so the scaling is unchanged: W_res + s B A = W + s (B A - B0 A0). `PeftModel.from_pretrained(original, dir)`
loads it. Quantized base (quant.method=nf4, ...): the residual is what gets quantized, base = quant(W - s B A),
as LoftQ / EoRA do (ADAPTER_INITS), and the run is saved as a quantized checkpoint.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn as nn

from slimtune.adapters.inject import replace_module
from slimtune.adapters.loftq import base_module, targets
from slimtune.adapters.lora import LoRALinear
from slimtune.adapters.lowrank_setup import LowRankSetup
from slimtune.errors import ConfigError
from slimtune.registry import ADAPTER_INITS
from slimtune.technique import declares


@torch.no_grad()
def pissa_factors(W: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) fp32 per PEFT's pissa_init: s B A is the rank-r truncated SVD of W."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    Sr = S[:rank] / scaling
    A = torch.diag(torch.sqrt(Sr)) @ Vh[:rank]
    B = U[:, :rank] @ torch.diag(torch.sqrt(Sr))
    return A.contiguous(), B.contiguous()


@torch.no_grad()
def pissa_init_(m: LoRALinear, options, name: str | None = None) -> None:
    """On a full-precision nn.Linear base: factors from its SVD, base weight replaced by the residual (in its
    own dtype), A0 / B0 kept for the converted save. The saved adapter has rank 2r, hence 2r <= min(in, out)."""
    base, limit = m.base, min(m.in_features, m.out_features)
    if type(base) is not nn.Linear:
        raise ConfigError(
            f"adapter.init=pissa: {name} is a {type(base).__name__}; on a quantized base PiSSA needs "
            "quant.method=nf4, nf3, int4, ... with quant.backend=slimtune"
        )
    if 2 * m.rank > limit:
        raise ConfigError(
            f"lora.rank={m.rank} with adapter.init=pissa: the saved adapter (converted to plain "
            f"LoRA) has rank {2 * m.rank} > min(in, out)={limit} of {name}; use lora.rank<="
            f"{limit // 2}"
        )
    W = base.weight.detach().float()
    A, B = pissa_factors(W, m.rank, m.scaling)
    m.lora_A.weight.copy_(A)
    m.lora_B.weight.copy_(B)
    base.weight.copy_((W - m.scaling * (B @ A)).to(base.weight.dtype))
    m.register_buffer("pissa_A0", A.clone(), persistent=False)
    m.register_buffer("pissa_B0", B.clone(), persistent=False)


def peft_factors(m: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, rank, alpha) to save in PEFT's format: the module's own, or, after a plain-base PiSSA init, the
    rank-2r LoRA relative to the original base (same scaling: alpha x 2, x sqrt 2 with rsLoRA)."""
    A, B = m.lora_A.weight.detach().float(), m.lora_B.weight.detach().float()
    A0 = getattr(m, "pissa_A0", None)
    if A0 is None:
        return A, B, m.rank, m.alpha
    A = torch.cat([A, A0.float()], dim=0)
    B = torch.cat([B, -m.pissa_B0.float()], dim=1)
    alpha = m.alpha * (math.sqrt(2) if m.use_rslora else 2)
    return A, B, 2 * m.rank, alpha


def _pissa_requires(cfg) -> set[str]:
    return {"plain_lora", "undecomposed_base"} | ({"slimtune_format"} if cfg.quant.method != "none" else set())


@ADAPTER_INITS.register("pissa")
@declares(requires=_pissa_requires, withholds={"exact_zero", "streamable"})
@torch.no_grad()
def apply_pissa(
    model: nn.Module,
    setup: LowRankSetup,
    calibration=None,
    compute_dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> dict:
    """Quantize every targeted nn.Linear of the full-precision `model` in place at quant.method, as
    quant(W - s B A), and wrap it with LoRA holding PiSSA's A, B; needs no calibration data. Returns per-matrix
    errors ||W - deq(Q) - s B A||^2 and seconds."""
    t0 = time.perf_counter()
    a, modules = setup.lora, {}
    names = targets(model, setup)
    for name in names:
        old = model.get_submodule(name)
        W = old.weight.detach().float()
        base = base_module(setup.quant, old, compute_dtype)
        wrapped = LoRALinear(base, a.rank, a.alpha, a.dropout, use_rslora=a.use_rslora)
        A, B = pissa_factors(W, a.rank, wrapped.scaling)
        residual = W - wrapped.scaling * (B @ A)
        packed = base.quantize_weight(residual)
        base.set_weight(packed)
        wrapped.lora_A.weight.copy_(A)
        wrapped.lora_B.weight.copy_(B)
        replace_module(model, name, wrapped)
        modules[name] = {"error": float((residual - packed.dequantize(torch.float32)).double().square().sum())}
    log(f"pissa: initialised {len(names)} LoRA adapters on {setup.quant.method} in {time.perf_counter() - t0:.1f}s")
    return {"modules": modules, "seconds": time.perf_counter() - t0}


apply_pissa.wrap = pissa_init_  # on a plain base: as each module is wrapped (LoRALinear.from_config)
