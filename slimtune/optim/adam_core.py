"""Adam's moment update, shared by slimtune's optimizers (adamw, galore, dct, frugal).

The moments live in the optimizer state as plain tensors (so checkpoints stay safetensors + JSON):
fp32 `state[name]`, or with 8-bit states the block-wise quantized form written by states8bit.py
under `state[name + "_q_int8"]` / `"_q_uint8"` and `"_absmax"`. With 8-bit states, small moments (under
MIN_8BIT_SIZE = 4096 values) and the moments of 1-D parameters (norms, biases) stay in fp32, as in
bitsandbytes (`min_8bit_size=4096`) and torchao's 8-bit Adam: they cost little memory and are where
quantization error hurts most (`moment_bits`). `adam_direction` follows torch.optim.AdamW's arithmetic
(up to float rounding; `adamw_step` exactly), so with fp32 states and full-rank inputs every optimizer
here reproduces torch's AdamW.
"""

from __future__ import annotations

import math
from itertools import chain

import torch

from slimtune.optim.master import init_master_state, write_back

MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed)
MIN_8BIT_SIZE = 4096  # moments with fewer values stay fp32 with 8-bit states (bitsandbytes' min_8bit_size)


def moment_bits(shape, bits: int, param_ndim: int | None = None) -> int:
    """The storage (32 or 8) of a moment of `shape` under `optim.state_bits=bits`: 8-bit only when the
    moment has at least MIN_8BIT_SIZE values and its parameter is not 1-D (norms, biases; `param_ndim`
    defaults to the moment's own ndim, i.e. a moment in the parameter's shape)."""
    if bits not in (32, 8):
        raise ValueError(f"optim.state_bits must be 32 or 8, got {bits}")
    shape = tuple(shape)
    ndim = len(shape) if param_ndim is None else param_ndim
    if bits == 8 and (math.prod(shape) < MIN_8BIT_SIZE or ndim <= 1):
        return 32
    return bits


def new_moment(state: dict, name: str, shape, bits: int, signed: bool, device, param_ndim: int | None = None) -> None:
    """Zero moment `name` of `shape` in `state`: fp32 (bits 32, or a small / 1-D parameter's moment, see
    `moment_bits`) or block-wise 8-bit."""
    if moment_bits(shape, bits, param_ndim) == 32:
        state[name] = torch.zeros(shape, dtype=torch.float32, device=device)
    else:
        from slimtune.optim.states8bit import new_moment8

        new_moment8(state, name, shape, signed, device)


def read_moment(state: dict, name: str) -> torch.Tensor:
    """fp32 value of moment `name` (the live tensor for fp32 states, a fresh tensor for 8-bit)."""
    if name in state:
        return state[name]
    from slimtune.optim.states8bit import read_moment8

    return read_moment8(state, name)


def write_moment(state: dict, name: str, value: torch.Tensor) -> None:
    """Store `value` (fp32) as moment `name` (a no-op copy-free path when it is the live fp32 tensor)."""
    if name in state:
        if state[name] is not value:
            state[name].copy_(value)
        return
    from slimtune.optim.states8bit import write_moment8

    write_moment8(state, name, value)


def init_adam_state(state: dict, shape, bits: int, device, param_ndim: int | None = None) -> None:
    """`step` and both moments, zero, in `shape`; param_ndim: the parameter's ndim when the moments do
    not have the parameter's shape (FRUGAL's (k,) coordinates of a 2-D weight), for `moment_bits`."""
    state["step"] = torch.zeros((), dtype=torch.float32)
    for name, signed in MOMENTS:
        new_moment(state, name, shape, bits, signed, device, param_ndim)


def moment_keys(name: str) -> tuple[str, ...]:
    """Every state key moment `name` can occupy (fp32, or states8bit's codes + absmax)."""
    return (name, name + "_q_int8", name + "_q_uint8", name + "_absmax")


def reset_adam_moments(state: dict, shape, bits: int, device, param_ndim: int | None = None) -> None:
    """Zero both moments (keeping `step`), e.g. when a projection's subspace changes."""
    for name, signed in MOMENTS:
        for k in moment_keys(name):
            state.pop(k, None)
        new_moment(state, name, shape, bits, signed, device, param_ndim)


def keep_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Call after `torch.optim.Optimizer.load_state_dict(state_dict)`. torch casts every state tensor but
    "step" to its parameter's dtype: 8-bit codes become floats, integer indices / packed masks become
    floats, and bf16 parameters would get bf16 moments. Put back copies of the saved tensors as saved."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for pid, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(pid, {}).items():
            if torch.is_tensor(value) and key != "step":
                optimizer.state[p][key] = value.to(device=p.device, copy=True)


def _advance_moments(
    state: dict, grad: torch.Tensor, betas: tuple[float, float], eps: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Increment state["step"], advance both moments with `grad` and return (m, denom, bc1):
    m the new first moment (fp32), denom = sqrt(v) / sqrt(1 - b2^t) + eps, bc1 = 1 - b1^t, each with
    torch.optim.AdamW's (single-tensor) arithmetic."""
    b1, b2 = betas
    state["step"] += 1
    t = float(state["step"])
    m, v = read_moment(state, "exp_avg"), read_moment(state, "exp_avg_sq")
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    write_moment(state, "exp_avg", m)
    write_moment(state, "exp_avg_sq", v)
    bc1, bc2_sqrt = 1 - b1**t, (1 - b2**t) ** 0.5
    return m, (v.sqrt() / bc2_sqrt).add_(eps), bc1


@torch.no_grad()
def adam_direction(state: dict, grad: torch.Tensor, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Advance the moments with `grad` (fp32, the state's shape) and return the update direction

        d = m_hat / (sqrt(v_hat) + eps)   with   m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)

    with torch.optim.AdamW's arithmetic (p -= lr * d matches it to float rounding with fp32 states;
    adamw_step, which needs no direction tensor, matches it exactly). Increments state["step"]."""
    m, denom, bc1 = _advance_moments(state, grad, betas, eps)
    return (m / bc1).div_(denom)


def apply_update(p: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """p <- p * (1 - lr * wd) - lr * update (decoupled decay), in fp32 and written back in p's dtype."""
    w = p if p.dtype == torch.float32 else p.float()
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    w.add_(update, alpha=-lr)
    if w is not p:
        p.copy_(w)


def adamw_step(state: dict, p: torch.Tensor, group: dict, key: int = 0) -> None:
    """One AdamW step of `p` from p.grad, with 8-bit moments if group["state_bits"] == 8 and p is large
    enough (see `moment_bits`). group: lr, betas, eps, weight_decay, state_bits (and compensation for bf16
    parameters, master.py; key: the parameter's master.param_key).

    torch.optim.AdamW(foreach=False)'s exact operations (decay, then p += -lr / bc1 * m / denom by
    addcdiv), in fp32: with fp32 moments and fp32 parameters the result is bit-identical to torch's."""
    if "step" not in state:
        init_adam_state(state, p.shape, group["state_bits"], p.device, p.dim())
        init_master_state(state, p, group.get("compensation", "none"))
    adamw_update(state, p, p.grad.float(), group, key)


def adamw_update(state: dict, p: torch.Tensor, grad: torch.Tensor, group: dict, key: int = 0, start: int = 0) -> None:
    """adamw_step's arithmetic on an initialised `state`, with `grad` given: every operation is elementwise,
    so a slice of p, grad and the moments (8-bit ones cut at whole blocks of 256) gives the bits the whole
    tensor gives. The offload engine streams the state through it chunk by chunk (start: the slice's first
    element, for stochastic rounding's random stream)."""
    lr, weight_decay = group["lr"], group["weight_decay"]
    m, denom, bc1 = _advance_moments(state, grad, tuple(group["betas"]), group["eps"])
    w = p if p.dtype == torch.float32 else p.float()
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    w.addcdiv_(m, denom, value=-lr / bc1)
    if w is not p:
        write_back(p, w, state, group.get("compensation", "none"), key, start)
