"""bf16 master weights (optim.master_dtype=bfloat16): the trained weights are held in bf16 (half the bytes of
fp32 masters, in memory or in the offload store) and the optimizer's fp32 result is written back with
`optim.compensation`:

  stochastic  rounded up or down at random, with probability the distance to the other neighbour, so the
              rounding is unbiased: E[bf16(w)] = w (torchao's bf16 stochastic-rounding AdamW). The 16 random
              bits of each value come from a generator seeded by (parameter, step, block of ROUND_BLOCK
              values): any slice gives the bits the whole tensor gives (the offload engine's chunks).
  kahan       round to nearest, and keep what was lost in a bf16 buffer `kahan_comp` (one more bf16 per
              value) that is added to the next update (Kahan summation, as optimi does):
                  y = (w_new - w) + c;  w' = bf16(w + y);  c' = bf16(y - (w' - w))
  none        round to nearest (updates below half a bf16 ulp of w are lost).

`auto` is stochastic with bf16 masters and none with fp32 ones. Every operation is elementwise.
"""

from __future__ import annotations

import struct

import torch
import xxhash

from slimtune.errors import ConfigError
from slimtune.registry import OPTIONS
from slimtune.technique import Technique

ROUND_BLOCK = 2**22  # values per random stream (the offload store's CHUNK, so a chunk draws one stream)
KAHAN_KEY = "kahan_comp"


def compensation_of(optim) -> str:
    """optim.compensation with `auto` resolved for optim.master_dtype."""
    if optim.compensation != "auto":
        return optim.compensation
    return "stochastic" if optim.master_dtype == "bfloat16" else "none"


def param_key(name: str) -> int:
    """The stochastic rounding's per-parameter seed: from its qualified name, so every engine (and the offload
    engine's resident and streamed parameters alike) draws the same bits for it."""
    return xxhash.xxh3_64_intdigest(name.encode())


def _stream(key: int, step: int, block: int) -> torch.Generator:
    seed = xxhash.xxh3_64_intdigest(struct.pack("<QQQ", key, step, block)) & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def random_bits(n: int, key: int, step: int, start: int) -> torch.Tensor:
    """Values start .. start + n of the parameter's 16-bit random stream at `step`, as int32."""
    out = torch.empty(n, dtype=torch.int32)
    pos = 0
    while pos < n:
        block, offset = divmod(start + pos, ROUND_BLOCK)
        take = min(n - pos, ROUND_BLOCK - offset)
        bits = torch.empty(offset + take, dtype=torch.int32).random_(0, 1 << 16, generator=_stream(key, step, block))
        out[pos : pos + take] = bits[offset:]
        pos += take
    return out


def stochastic_round(value: torch.Tensor, key: int, step: int, start: int = 0) -> torch.Tensor:
    """fp32 `value` (contiguous) -> bf16, rounded away from zero in magnitude with probability (dropped low 16
    bits) / 2^16: adding 16 random bits to the fp32 pattern carries into bf16's last bit exactly then."""
    bits = value.reshape(-1).view(torch.int32)
    rounded = (bits + random_bits(bits.numel(), key, step, start)).bitwise_and_(-65536)
    out = rounded.view(torch.float32).to(torch.bfloat16).view(value.shape)
    finite = torch.isfinite(value)  # inf / nan keep their value (a carry would turn the largest float into inf)
    return out if bool(finite.all()) else torch.where(finite, out, value.to(torch.bfloat16))


def write_back(p: torch.Tensor, w: torch.Tensor, state: dict, compensation: str, key: int, start: int = 0) -> None:
    """Store the optimizer's fp32 result `w` into the low-precision parameter `p` (still holding the old value)."""
    if compensation == "stochastic":
        p.copy_(stochastic_round(w.contiguous(), key, int(state["step"]), start))
    elif compensation == "kahan":
        old = p.float()
        y = w.sub_(old).add_(state[KAHAN_KEY].float())  # the update plus what earlier roundings lost
        p.copy_(old + y)
        state[KAHAN_KEY].copy_(y.sub_(p.float().sub_(old)))
    else:
        p.copy_(w)


def init_master_state(state: dict, p: torch.Tensor, compensation: str) -> None:
    """kahan_comp (zero, p's dtype and shape) for a low-precision parameter under kahan."""
    if compensation == "kahan" and p.dtype != torch.float32:
        state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.contiguous_format)


@OPTIONS.register("optim.master_dtype")
class MasterWeights(Technique):
    """optim.master_dtype=bfloat16: full fine-tuning with bf16 trained weights and slimtune's AdamW."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.optim.master_dtype != "float32" or cfg.optim.compensation not in ("auto", "none")

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.optim
        if o.master_dtype == "float32":
            raise ConfigError(
                f"optim.compensation={o.compensation} applies to bf16 master weights: set "
                "optim.master_dtype=bfloat16 or optim.compensation=none"
            )
        if cfg.adapter.type != "none":
            raise ConfigError(
                f"optim.master_dtype=bfloat16 is for full fine-tuning, not adapter.type={cfg.adapter.type}: set "
                "adapter.type=none or optim.master_dtype=float32 (adapters train small fp32 tensors)"
            )
        if o.name != "adamw" or o.in_backward:
            which = f"optim.name={o.name}" if o.name != "adamw" else "optim.in_backward=true"
            raise ConfigError(
                f"optim.master_dtype=bfloat16 runs with slimtune's AdamW, not {which}: set optim.name=adamw "
                "optim.in_backward=false or optim.master_dtype=float32"
            )
        if cfg.engine.name not in ("ddp", "offload"):
            raise ConfigError(
                f"optim.master_dtype=bfloat16 runs with engine.name=ddp or offload, not engine.name={cfg.engine.name}: "
                "change one of engine.name and optim.master_dtype"
            )
        if cfg.train.precision != "default":
            raise ConfigError(
                f"train.precision={cfg.train.precision} keeps fp32 master weights: change one of train.precision "
                "and optim.master_dtype"
            )
