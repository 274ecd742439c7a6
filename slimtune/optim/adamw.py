"""slimtune's AdamW: torch.optim.AdamW's update on adam_core's moments, with fp32 or block-wise 8-bit states.

    p <- p * (1 - lr * weight_decay) - lr * m_hat / (sqrt(v_hat) + eps)      (decoupled weight decay)

With state_bits=32 it matches torch.optim.AdamW(foreach=False) bit for bit (fp32 parameters); with state_bits=8 the
two moments take ~1.02 bytes per value instead of 4 each (states8bit.py), except for parameters under
4096 values and 1-D ones (norms, biases), whose moments stay fp32 (adam_core.moment_bits, the
bitsandbytes / torchao rule), so their updates are torch's AdamW exactly. Parameters of any float dtype
are updated in fp32 and written back in their own dtype.
"""

from __future__ import annotations

import math

import torch

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.optim.adam_core import MIN_8BIT_SIZE, adamw_step, keep_saved_dtypes
from slimtune.optim.memory import STEP_RATE
from slimtune.optim.common import adam_kwargs
from slimtune.optim.master import compensation_of, param_key
from slimtune.registry import OPTIMIZERS
from slimtune.technique import declares


class AdamW(torch.optim.Optimizer):
    """AdamW(params, lr, betas, eps, weight_decay, state_bits, compensation, names); every option may differ per
    param group. compensation (master.py): how bf16 parameters take the fp32 update; names: each parameter's
    qualified name (stochastic rounding's per-parameter stream; default: its position)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_bits: int = 32,
        compensation: str = "none",
        names: list[str] | None = None,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}")
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits}")
        if compensation not in ("none", "kahan", "stochastic"):
            raise ValueError(f"compensation must be none, kahan or stochastic, got {compensation}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "state_bits": state_bits,
            "compensation": compensation,
        }
        super().__init__(params, defaults)
        ordered = [p for g in self.param_groups for p in g["params"]]
        names = names or [f"param{i}" for i in range(len(ordered))]
        self.keys = {p: param_key(n) for p, n in zip(ordered, names)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("slimtune AdamW does not support sparse gradients")
                adamw_step(self.state[p], p, group, self.keys[p])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep_saved_dtypes(self, state_dict)  # torch would cast codes / indices / fp32 moments


@OPTIMIZERS.register("adamw")
@declares()
def build_adamw(optim, options, named, lr):
    params = [p for _, p in named]
    compensation = compensation_of(optim)
    if optim.state_bits == 8 or optim.master_dtype != "float32" or compensation != "none":
        names = [n for n, _ in named]
        return AdamW(
            params, lr=lr, state_bits=optim.state_bits, compensation=compensation, names=names, **adam_kwargs(optim)
        )
    # foreach=False keeps one parameter's temporaries alive at a time (lower peak memory on CPU)
    return torch.optim.AdamW(params, lr=lr, foreach=False, **adam_kwargs(optim))


def _state_bits_32(cfg) -> None:
    if cfg.optim.state_bits != 32:
        raise ConfigError(
            f"optim.state_bits={cfg.optim.state_bits} applies to adamw, galore, frugal and dct, not "
            f"optim.name={cfg.optim.name}"
        )


def _bnb_state_bytes(optim, options, name: str, shape) -> int:
    """bitsandbytes: 2 x (N + 4 ceil(N / 256)) from MIN_8BIT_SIZE values on, else fp32; `step` is a Python int."""
    n = math.prod(shape)
    return 2 * (n + 4 * -(-n // 256)) if n >= MIN_8BIT_SIZE else 8 * n


def _bnb_shared_bytes(optim, options, tensors) -> int:
    """Its two 256-value fp32 quantization maps, shared by every 8-bit parameter."""
    return 2 * 256 * 4 if any(math.prod(shape) >= MIN_8BIT_SIZE for _, shape in tensors) else 0


@OPTIMIZERS.register("adamw8bit")
@declares(
    requires={"whole_matrices"},
    withholds={"per_tensor_state"},
    validate=_state_bits_32,
    state_bytes=_bnb_state_bytes,
    shared_bytes=_bnb_shared_bytes,
    step_bytes=lambda optim, options, name, shape: STEP_RATE["other"] * math.prod(shape),
)
def build_adamw8bit(optim, options, named, lr):
    """bitsandbytes' AdamW8bit (it keeps its own state: the offload engine cannot stream it)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SlimtuneError(
            "optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes "
            "(or optim.name=adamw optim.state_bits=8, slimtune's own 8-bit states)"
        ) from None
    return bnb.optim.AdamW8bit([p for _, p in named], lr=lr, **adam_kwargs(optim))
