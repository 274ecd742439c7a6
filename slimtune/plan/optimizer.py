"""Optimizer state by optim.name, counted as slimtune/optim/ allocates it, and the step's working memory.

Per trainable tensor of shape (m, n) (numel N):
  adamw          exp_avg + exp_avg_sq fp32: 8 N (torch.optim.AdamW), + a 4-byte step
  state_bits=8   slimtune's block-wise moments: 2 x (N int8/uint8 codes + 4 ceil(N / 256) absmax), for
                 moments of >= 4096 values whose parameter is not 1-D (adam_core.moment_bits); else fp32
  adamw8bit      bitsandbytes: 2 x (N + 4 ceil(N / 256)) from 4096 values on (its min_8bit_size), else fp32;
                 no step tensor; two 256-value fp32 quantization maps shared by all
  sgd            momentum > 0: one fp32 buffer, 4 N; else nothing
  galore / dct   2-D weights outside optim.full_rank_modules: moments in the projected shape (m, r) when
                 m >= n (r = min(rank, m, n)), else (r, n); GaLore's P (r, n) / (m, r) in optim.proj_dtype
                 (int8: + one fp32 scale per basis vector), DCT's r int64 indices; the rest plain AdamW
  frugal         moments in the subspace's shape: svd / random (m, k) or (k, n), k = round(density * side) +
                 P; blocks k = ceil(density * side) whole columns/rows + k int64 indices; coordinates
                 k = round(density m n) values (8-bit from 4096 on) + an m n / 8 byte mask; modules the
                 expected density share of the weights with full moments
"""

from __future__ import annotations

import math

from slimtune.optim.adam_core import MIN_8BIT_SIZE, moment_bits
from slimtune.optim.states8bit import BLOCK
from slimtune.plan.weights import Tensor

PROJ_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
STEP_BYTES = 4  # Adam's fp32 `step` tensor per parameter

# Working memory of one optimizer step, bytes per value of the tensor being stepped (the step runs parameter by
# parameter, foreach=False, so one tensor's temporaries are live at a time). Measured: peak RSS growth of the
# second step on a (49152, 576) and a (1536, 576) fp32 parameter with MALLOC_MMAP_THRESHOLD_=131072 (RSS ~ live):
#   torch AdamW: the denominator and the update (2 fp32)                                         8
#   slimtune 8-bit moments: both dequantized, code indices (int64), re-quantization's copies     41
#   GaLore / DCT on a projected weight: the back-projected fp32 update and the projected moments  5
#   FRUGAL on a projected weight: the state-full and the state-free (signSGD) parts              9
#   SGD without momentum: in place                                                               0
# (bitsandbytes' AdamW8bit and SGD with momentum: not measured, 4 assumed)
STEP_RATE = {"adamw": 8.0, "adamw8": 41.0, "projected": 5.0, "frugal": 9.0, "sgd": 0.0, "other": 4.0}


def _moments(shape, bits: int, param_ndim: int) -> int:
    """Bytes of Adam's two moments of `shape` under optim.state_bits=bits (adam_core.moment_bits)."""
    n = math.prod(shape)
    if moment_bits(shape, bits, param_ndim) == 32:
        return 8 * n
    return 2 * (n + 4 * -(-n // BLOCK))


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0].rsplit(".", 1)[-1]


def _lowrank(cfg, t: Tensor) -> bool:
    """optim.lowrank_groups' rule: 2-D weights outside full_rank_modules are projected."""
    return len(t.shape) == 2 and _module(t.name) not in cfg.full_rank_modules


def _projected(cfg, t: Tensor) -> int:
    m, n = t.shape
    side = "right" if (cfg.proj_type == "right" or (cfg.proj_type == "std" and m >= n)) else "left"
    r = min(cfg.rank, m, n)
    low = (m, r) if side == "right" else (r, n)
    state = _moments(low, cfg.state_bits, 2) + STEP_BYTES
    if cfg.name == "dct":
        return state + 8 * r  # proj_index int64
    full = n if side == "right" else m
    proj = r * full * PROJ_BYTES[cfg.proj_dtype] + (4 * r if cfg.proj_dtype == "int8" else 0)
    return state + proj


def _frugal(cfg, t: Tensor) -> int:
    m, n = t.shape
    sub = cfg.subspace
    if sub == "modules":  # whole parameters: the expected share with full moments
        return round(cfg.density * (_moments((m, n), cfg.state_bits, 2) + STEP_BYTES))
    if sub == "coordinates":
        k = round(cfg.density * m * n)
        return (_moments((k,), cfg.state_bits, 2) + STEP_BYTES if k else 0) + -(-m * n // 8)
    side, full = ("right", n) if m >= n else ("left", m)
    k = min(math.ceil(cfg.density * full) if sub == "blocks" else round(cfg.density * full), full)
    if k == 0:
        return 0
    low = (m, k) if side == "right" else (k, n)
    extra = 8 * k if sub == "blocks" else (k * full * PROJ_BYTES[cfg.proj_dtype] +
                                           (4 * k if cfg.proj_dtype == "int8" else 0))
    return _moments(low, cfg.state_bits, 2) + STEP_BYTES + extra


def _adamw8bit(t: Tensor) -> int:
    """bitsandbytes keeps `step` as a Python int, so no step tensor."""
    n = t.numel
    return 2 * (n + 4 * -(-n // 256)) if n >= MIN_8BIT_SIZE else 8 * n


BNB_QMAPS = 2 * 256 * 4  # bitsandbytes' two fp32 quantization maps (shared by every 8-bit parameter)


def state_bytes(cfg, tensors: list[Tensor]) -> int:
    """Bytes of the optimizer state after its first step. cfg: OptimConfig; tensors: the trainable ones."""
    total, qmaps = 0, 0
    for t in tensors:
        plain = _moments(t.shape, cfg.state_bits, len(t.shape)) + STEP_BYTES
        if cfg.name == "adamw":
            total += plain
        elif cfg.name == "adamw8bit":
            total += _adamw8bit(t)
            qmaps = BNB_QMAPS if t.numel >= MIN_8BIT_SIZE else qmaps
        elif cfg.name == "sgd":
            total += 4 * t.numel if cfg.momentum else 0
        elif cfg.name in ("galore", "dct"):
            total += _projected(cfg, t) if _lowrank(cfg, t) else plain
        elif cfg.name == "frugal":
            total += _frugal(cfg, t) if _lowrank(cfg, t) else plain
        else:  # an optimizer registered later: assume Adam-like fp32 moments
            total += plain
    return total + qmaps


def _step_rate(cfg, t: Tensor) -> float:
    """Bytes per value the optimizer step of tensor t holds while it runs (STEP_RATE)."""
    if cfg.name == "sgd":
        return STEP_RATE["other"] if cfg.momentum else STEP_RATE["sgd"]
    if cfg.name == "adamw8bit":
        return STEP_RATE["other"]
    if cfg.name in ("galore", "dct", "frugal") and _lowrank(cfg, t):
        m, n = t.shape
        rate = STEP_RATE["frugal" if cfg.name == "frugal" else "projected"]
        low = min(cfg.rank if cfg.name != "frugal" else math.ceil(cfg.density * min(m, n)), m, n)
        return rate + (STEP_RATE["adamw8"] - STEP_RATE["adamw"]) * low / min(m, n) * (cfg.state_bits == 8)
    if moment_bits(t.shape, cfg.state_bits, len(t.shape)) == 8:
        return STEP_RATE["adamw8"]
    return STEP_RATE["adamw"]


def step_transient_bytes(cfg, tensors: list[Tensor]) -> int:
    """Working memory of the optimizer step at its largest tensor (plus DCT's cached bases)."""
    if not tensors:
        return 0
    extra = 0
    if cfg.name == "dct":  # the orthonormal DCT basis (n, n) fp32 per distinct projected side, cached
        sides = {t.shape[1] if t.shape[0] >= t.shape[1] else t.shape[0] for t in tensors if _lowrank(cfg, t)}
        extra = sum(4 * s * s for s in sorted(sides)[-8:])
    return int(max(_step_rate(cfg, t) * t.numel for t in tensors)) + extra
