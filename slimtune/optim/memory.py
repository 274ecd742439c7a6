"""An optimizer's memory terms, declared beside its builder (plan/optimizer.py sums them per tensor):

  state_bytes(optim, options, name, shape) -> int     its state for one trainable tensor after the first step
  step_bytes(optim, options, name, shape) -> float    working memory while that tensor's step runs
  shared_bytes(optim, options, tensors) -> int        state shared by all tensors (quantization maps)
  cache_bytes(optim, options, tensors) -> int         what the steps keep cached beside the state (DCT's bases)

optim: the optim section; options: the optimizer's own (galore.*, ...); tensors: (name, shape) pairs. A
builder that declares none gets Adam's (`adam_state_bytes`, `adam_step_bytes`): fp32 or 8-bit moments.
"""

from __future__ import annotations

import math

from slimtune.optim.adam_core import moment_bits
from slimtune.optim.states8bit import BLOCK

PROJ_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}  # a projection P stored in proj_dtype
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


def moment_bytes(shape, bits: int, param_ndim: int) -> int:
    """Bytes of Adam's two moments of `shape` under optim.state_bits=bits (adam_core.moment_bits)."""
    n = math.prod(shape)
    if moment_bits(shape, bits, param_ndim) == 32:
        return 8 * n
    return 2 * (n + 4 * -(-n // BLOCK))


def is_lowrank(optim, name: str, shape) -> bool:
    """common.lowrank_groups' rule: 2-D weights outside optim.full_rank_modules are projected."""
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return len(shape) == 2 and module not in optim.full_rank_modules


def adam_state_bytes(optim, options, name: str, shape) -> int:
    """Both moments and `step`, plus Kahan's bf16 buffer with bf16 master weights (master.py)."""
    kahan = 2 * math.prod(shape) if optim.master_dtype == "bfloat16" and optim.compensation == "kahan" else 0
    return moment_bytes(shape, optim.state_bits, len(shape)) + STEP_BYTES + kahan


def adam_step_bytes(optim, options, name: str, shape) -> float:
    rate = STEP_RATE["adamw8" if moment_bits(shape, optim.state_bits, len(shape)) == 8 else "adamw"]
    return rate * math.prod(shape)


def lowrank_step_bytes(optim, rate: float, low: int, shape) -> float:
    """A projected weight's step: `rate` (STEP_RATE), plus 8-bit moments' dequantization for the low share."""
    m, n = shape
    return (rate + (STEP_RATE["adamw8"] - STEP_RATE["adamw"]) * low / min(m, n) * (optim.state_bits == 8)) * m * n


def projection_bytes(rank: int, side: int, proj_dtype: str) -> int:
    """A projection P of `rank` vectors of length `side` in proj_dtype (int8: + one fp32 scale per vector)."""
    return rank * side * PROJ_BYTES[proj_dtype] + (4 * rank if proj_dtype == "int8" else 0)
