"""LQ-LoRA (Guo et al. 2024): W ~ Q + L1 L2, Q quantized and frozen, L1 L2 the trainable LoRA factors.

Decomposition (per matrix, `decompose`): alternate L = best rank-r approximation of W - Q (randomized
SVD) and Q = quantize(W - L), stop when the error stops falling or after max_iters, keep the best
iterate. With diagonal Fisher information F ~ r c^T / sum(F) (row/column sums, calibration.py)
the low-rank step is a weighted SVD: minimise ||D_r (W - Q - L) D_c||_F, D = diag(sqrt(.)), which is
exact for rank-1 weights, so important rows/columns are reconstructed better.

Bit allocation (`apply_lq_lora`): every matrix is decomposed at every candidate NF-k x block size;
an integer linear program (quant/bit_allocation.py, scipy's milp) picks one configuration per matrix
minimising the total (Fisher-weighted) error under the average bits/param budget of codes + scales.
Candidates are scored with `lq_lora.score_iters` alternations; the chosen one gets `max_iters`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from slimtune.adapters.inject import check_rank, replace_module, target_names
from slimtune.adapters.lora import LoRALinear
from slimtune.adapters.lowrank_setup import LowRankSetup
from slimtune.quant import PackedLinear, QuantFormat, bits_per_param, quantize_packed
from slimtune.quant.bit_allocation import allocate_bits
from slimtune.errors import ConfigError
from slimtune.quant.pv_tuning import check_pv_setting
from slimtune.registry import ADAPTERS, OPTIONS, QUANT_FORMATS
from slimtune.technique import Technique
from slimtune.schema import config_section, option


@config_section("lq_lora", fixed=True)
@dataclass(frozen=True)
class LQLoRAConfig:
    """quant.method=lq_lora's options (and the calibration LoftQ / EoRA use)."""

    budget_bits: float = option("average bits/param of the quantized base (codes + scales)", 3.0)
    fisher: bool = option("weight the decomposition and the allocation by the diagonal Fisher", True)
    calibration_samples: int = option("train blocks for the Fisher / EoRA activation statistics", 16)
    max_iters: int = option("alternations of quantize / low-rank (LQ-LoRA, LoftQ) for the final decomposition", 10)
    score_iters: int = option("alternations when scoring every candidate format for the bit allocation", 2)
    bits: tuple[int, ...] = option("NormalFloat bit widths the allocation may choose", (2, 3, 4))
    block_sizes: tuple[int, ...] = option("block sizes the allocation may choose", (64, 128, 256))
    pv_tuning: bool = option(
        "PV-Tuning of the quantized part Q during training (quant/pv_tuning.py): codes as discrete variables, "
        "learned block scales, a full-precision straight-through buffer per matrix (ddp engine)",
        False,
    )
    pv_fraction: float = option("PV-Tuning: at most this fraction of each matrix's codes change per step", 0.001)


@ADAPTERS.register("lq_lora")
class LQLoRALinear(LoRALinear):
    """LoRA whose factors start (init_factors) at the low-rank part of W ~ Q + L1 L2; the base holds Q.
    Its own type so checkpoints and reports tell LQ-LoRA from LoRA on a uniformly quantized base."""

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"lq_lora_base"}

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"plain_lora"}


class LQLoRABase(Technique):
    """quant.method=lq_lora: the base decomposed into quantized (mixed NF-k, bit allocation) + LoRA factors."""

    section = "lq_lora"

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"slimtune_format", "lora_factors"}

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {
            "trainable_base",
            "full_precision_linears",
            "streamable",
            "exact_zero",
            "quantized_base",
            "undecomposed_base",
        }

    @classmethod
    def validate(cls, cfg) -> None:
        validate_lq_lora(cfg.lq_lora)


@OPTIONS.register("lq_lora.pv_tuning")
class LQLoRAPVTuning(Technique):
    """lq_lora.pv_tuning=true: PV-Tuning of LQ-LoRA's quantized part (adapters/lq_lora.py apply_pv_tuning); on
    another base it would do nothing, so it is refused there."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.lq_lora.pv_tuning

    @classmethod
    def validate(cls, cfg) -> None:
        settings = (
            ("quant.method", cfg.quant.method, "lq_lora"),
            ("adapter.type", cfg.adapter.type, "lq_lora"),
            ("engine.name", cfg.engine.name, "ddp"),
            ("optim.in_backward", cfg.optim.in_backward, False),
        )
        lq = cfg.lq_lora
        check_pv_setting(
            "lq_lora.pv_tuning", "LQ-LoRA's quantized part", settings, "lq_lora.pv_fraction", lq.pv_fraction
        )


def validate_lq_lora(lq) -> None:
    """The lq_lora section's values (LQ-LoRA's, and LoftQ's / EoRA's calibration)."""
    for key in ("calibration_samples", "max_iters", "score_iters"):
        if getattr(lq, key) <= 0:
            raise ConfigError(f"lq_lora.{key}={getattr(lq, key)} must be > 0")
    if not lq.bits or not all(isinstance(b, int) and 2 <= b <= 8 for b in lq.bits):
        raise ConfigError(f"lq_lora.bits={list(lq.bits)}: give bit widths in 2..8, e.g. [2, 3, 4]")
    if not lq.block_sizes or not all(isinstance(b, int) and b > 0 for b in lq.block_sizes):
        raise ConfigError(f"lq_lora.block_sizes={list(lq.block_sizes)}: give positive block sizes, e.g. [64, 128]")
    if not min(lq.bits) <= lq.budget_bits <= max(lq.bits) + 1:
        raise ConfigError(
            f"lq_lora.budget_bits={lq.budget_bits} is outside the candidate range "
            f"{min(lq.bits)}..{max(lq.bits) + 1} bits/param (lq_lora.bits={list(lq.bits)})"
        )


QUANT_FORMATS.declare("lq_lora", LQLoRABase)


@dataclass
class Decomposition:
    """Best iterate of `decompose`: packed Q (quantized-weight holder), L1 (out, r), L2 (r, in)."""

    packed: object
    L1: torch.Tensor
    L2: torch.Tensor
    error: float  # (weighted) squared Frobenius error of W - Q - L1 L2
    history: list = field(default_factory=list)  # error after every half-step, in order


def weighted_sq_error(E: torch.Tensor, dr: torch.Tensor | None = None, dc: torch.Tensor | None = None) -> float:
    """sum_ij (dr_i dc_j E_ij)^2; unweighted ||E||_F^2 when dr/dc are None."""
    if dr is not None:
        E = E * dr[:, None] * dc[None, :]
    return float(E.double().square().sum())


def lowrank(
    R: torch.Tensor,
    rank: int,
    dr: torch.Tensor | None = None,
    dc: torch.Tensor | None = None,
    exact: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 (out, r), L2 (r, in)) minimising ||D_r (R - L1 L2) D_c||_F (plain SVD when dr/dc are None).

    Randomized SVD (Halko et al., torch.svd_lowrank, seeded) unless `exact` or the matrix is small;
    the singular values are split evenly, L1 = U sqrt(S), L2 = sqrt(S) V^T, which balances the factors.
    """
    A = R.float() if dr is None else R.float() * dr[:, None] * dc[None, :]
    if exact or rank + 16 >= min(A.shape):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(A, q=rank + 16, niter=4)
        Vh = V.T
    s = S[:rank].sqrt()
    L1, L2 = U[:, :rank] * s, s[:, None] * Vh[:rank]
    if dr is not None:
        L1, L2 = L1 / dr[:, None], L2 / dc[None, :]
    return L1.contiguous(), L2.contiguous()


def fisher_weights(
    row_sums: torch.Tensor, col_sums: torch.Tensor, floor: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(dr, dc, scale) with scale * dr_i^2 dc_j^2 = r_i c_j / sum(F), the rank-1 approximation of the
    Fisher F. dr and dc are normalised to mean square 1 (Fisher values are tiny: unnormalised weights
    would make float32 denormals, which are ~100x slower); weighted errors are multiplied by `scale`.
    Entries are floored at `floor` x their mean so no row/column gets weight 0 (and L stays finite)."""
    r, c = row_sums.double(), col_sums.double()
    r = r.clamp(min=floor * float(r.mean()) + 1e-300)
    c = c.clamp(min=floor * float(c.mean()) + 1e-300)
    scale = float(r.mean() * c.mean() / row_sums.double().sum().clamp(min=1e-300))
    return (r / r.mean()).sqrt().float(), (c / c.mean()).sqrt().float(), scale


@torch.no_grad()
def decompose(
    W: torch.Tensor,
    quantize_fn: Callable,
    rank: int,
    max_iters: int = 10,
    dr: torch.Tensor | None = None,
    dc: torch.Tensor | None = None,
    start: str = "lowrank",
    guard: bool = True,
    exact: bool = False,
    rtol: float = 1e-4,
) -> Decomposition:
    """Decompose W (out, in) into quantize_fn(.) + L1 L2; quantize_fn(w) returns a holder with .dequantize().

    start="lowrank" (LQ-LoRA): Q = 0, then L = SVD_r(W - Q), Q = quant(W - L), ...
    start="quantize" (LoftQ): Q = quant(W), then L = SVD_r(W - Q), Q = quant(W - L), ...
    Every half-step's error is recorded; a low-rank step never raises it (it is optimal for the fixed Q).
    The loop stops after max_iters iterations or when an iteration does not lower the error by rtol.
    guard=True also scores LoftQ's first iterate (quant(W) + SVD_r of its error), so the result is never
    worse than quantizing W alone.
    """
    W = W.detach().float()
    history: list[float] = []
    best: Decomposition | None = None

    def consider(packed, Qd, L1, L2):
        nonlocal best
        err = weighted_sq_error(W - Qd - L1 @ L2, dr, dc)
        history.append(err)
        if best is None or err < best.error:
            best = Decomposition(packed, L1, L2, err, history)
        return err

    if start not in ("lowrank", "quantize"):
        raise ValueError(f"decompose: start must be 'lowrank' or 'quantize', got {start!r}")
    if start == "quantize" or guard:  # LoftQ's first iterate
        packed0 = quantize_fn(W)
        Q0 = packed0.dequantize(torch.float32)
        L1_0, L2_0 = lowrank(W - Q0, rank, dr, dc, exact)
        consider(packed0, Q0, L1_0, L2_0)
    if start == "quantize":
        L1, L2, prev = L1_0, L2_0, best.error
    else:  # Q = 0
        (L1, L2), prev = lowrank(W, rank, dr, dc, exact), math.inf
    for _ in range(max_iters):
        packed = quantize_fn(W - L1 @ L2)
        Qd = packed.dequantize(torch.float32)
        consider(packed, Qd, L1, L2)
        L1, L2 = lowrank(W - Qd, rank, dr, dc, exact)
        err = consider(packed, Qd, L1, L2)  # never above the previous line's error (optimal L for this Q)
        if err > prev * (1 - rtol):
            break
        prev = err
    best.history = history
    return best


# ---------------------------------------------------------------- the model-level transform


def install(
    model: nn.Module, name: str, base: nn.Module, L1: torch.Tensor, L2: torch.Tensor, cfg, cls: type = LQLoRALinear
) -> nn.Module:
    """Replace module `name` by cls(base) (a LoRA wrapper) whose factors hold L1 L2. cfg: LoRAConfig."""
    wrapped = cls(base, L1.shape[1], cfg.alpha, cfg.dropout, use_rslora=cfg.use_rslora)
    wrapped.init_factors(L1, L2)
    return replace_module(model, name, wrapped)


def candidate_formats(lq_cfg, double_quant: bool) -> list:
    return [QuantFormat("nf", b, bs, double_quant) for b in lq_cfg.bits for bs in lq_cfg.block_sizes]


def apply_lq_lora(
    model: nn.Module,
    setup: LowRankSetup,
    calibration,
    compute_dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> dict:
    """Decompose every targeted linear of the full-precision `model` in place (LQ-LoRA with bit
    allocation) and wrap it with LQLoRALinear. setup: the sections it reads (adapters/lowrank_setup.py);
    calibration: an object whose `fisher_sums(model, names)` gives each matrix's Fisher row/column sums
    (calibration.py).
    Returns a summary: allocation (dict), per-matrix formats/errors, achieved bits/param, seconds."""
    lq, rank = setup.lq_lora, setup.lora.rank
    t0 = time.perf_counter()
    names = target_names(model, setup.target_modules, plain_only=True)
    check_rank(model, names, rank)
    fisher = calibration.fisher_sums(model, names) if lq.fisher else {}
    t_fisher = time.perf_counter() - t0
    formats = candidate_formats(lq, setup.quant.double_quant)
    errors, bits, numel = [], [], []
    every = max(1, len(names) // 10)
    for i, name in enumerate(names):  # score every candidate with a short decomposition
        W = model.get_submodule(name).weight.detach().float()
        dr, dc, scale = fisher_weights(*fisher[name]) if name in fisher else (None, None, 1.0)
        row_err, row_bits = [], []
        for fmt in formats:
            if W.numel() % fmt.block_size:
                row_err.append(math.inf), row_bits.append(99.0)
                continue
            d = decompose(W, _packed_quantizer(fmt), rank, lq.score_iters, dr, dc)
            row_err.append(d.error * scale), row_bits.append(fmt.bits_per_param(tuple(W.shape)))
        errors.append(row_err), bits.append(row_bits), numel.append(W.numel())
        if (i + 1) % every == 0 or i + 1 == len(names):
            log(
                f"lq_lora: scored {i + 1}/{len(names)} matrices at {len(formats)} formats "
                f"({time.perf_counter() - t0:.0f}s)"
            )
    t_alloc = time.perf_counter()
    alloc = allocate_bits(errors, bits, numel, lq.budget_bits, names=names, config_names=[f.name for f in formats])
    t_alloc = time.perf_counter() - t_alloc
    log(f"lq_lora: bit allocation {'optimal' if alloc.optimal else 'NOT proven optimal'} in {t_alloc:.1f}s")
    modules = {}
    for i, name in enumerate(names):  # the chosen format, decomposed with max_iters alternations
        fmt, old = formats[alloc.choice[i]], model.get_submodule(name)
        dr, dc, scale = fisher_weights(*fisher[name]) if name in fisher else (None, None, 1.0)
        d = decompose(old.weight, _packed_quantizer(fmt), rank, lq.max_iters, dr, dc)
        base = PackedLinear.from_packed(
            d.packed, bias=None if old.bias is None else old.bias.detach(), compute_dtype=compute_dtype
        )
        install(model, name, base, d.L1, d.L2, setup.lora)
        modules[name] = {
            "format": fmt.name,
            "shape": list(old.weight.shape),
            "bits_per_param": bits_per_param(base),
            "error": d.error * scale,
            "score_error": errors[i][alloc.choice[i]],
            "iterations": len(d.history),
        }
    log(
        f"lq_lora: decomposed {len(names)} matrices at {alloc.avg_bits:.3f} bits/param "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    return {
        "allocation": alloc.to_dict(),
        "table": alloc.table(),
        "modules": modules,
        "bits_per_param": alloc.avg_bits,
        "fisher_seconds": t_fisher,
        "allocation_seconds": t_alloc,
        "seconds": time.perf_counter() - t0,
    }


def apply_pv_tuning(model: nn.Module, master_dtype: torch.dtype, fraction: float) -> list:
    """lq_lora.pv_tuning: each LQ-LoRA wrapper's quantized base Q becomes a PV linear of Q's own format (its
    straight-through buffer starts at dequantized Q, its codes at Q's: the round trip through the learned scales
    re-rounds only the double-quantized scales), the LoRA factors staying beside it. Returns the PV hooks."""
    from slimtune.quant.fake import FakeQuantLinear, QuantFormatSpec
    from slimtune.quant.pv_tuning import PVTuning

    modules = []
    for m in model.modules():
        if not isinstance(m, LQLoRALinear) or not isinstance(m.base, PackedLinear):
            continue
        q = m.base
        plain = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        plain.weight = nn.Parameter(q.dequantize_weight(torch.float32).to(master_dtype))
        if q.bias is not None:
            plain.bias = nn.Parameter(q.bias.detach().clone(), requires_grad=False)
        m.base = FakeQuantLinear.from_linear(plain, QuantFormatSpec.of_module(q), pv=True)
        modules.append(m.base)
    return [PVTuning(modules, fraction)] if modules else []


def _packed_quantizer(fmt) -> Callable:
    return lambda w: quantize_packed(w, fmt)
