"""Adam's moment update, shared by slimtune's optimizers (adamw, galore, dct, frugal).

The moments live in the optimizer state as plain tensors (so checkpoints stay safetensors + JSON):
fp32 `state[name]`, or with 8-bit states the block-wise quantized form written by states8bit.py
under `state[name + "_q"]` and friends. `adam_direction` follows torch.optim.AdamW's arithmetic
(up to float rounding), so with fp32 states and full-rank inputs every optimizer here reproduces
torch's AdamW.
"""

from __future__ import annotations

import math
from itertools import chain

import torch

MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed)


def new_moment(state: dict, name: str, shape, bits: int, signed: bool, device) -> None:
    """Zero moment `name` of `shape` in `state`: fp32 (bits 32) or block-wise 8-bit (bits 8)."""
    if bits == 32:
        state[name] = torch.zeros(shape, dtype=torch.float32, device=device)
    elif bits == 8:
        from slimtune.optim.states8bit import new_moment8

        new_moment8(state, name, shape, signed, device)
    else:
        raise ValueError(f"optim.state_bits must be 32 or 8, got {bits}")


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


def init_adam_state(state: dict, shape, bits: int, device) -> None:
    state["step"] = torch.zeros((), dtype=torch.float32)
    for name, signed in MOMENTS:
        new_moment(state, name, shape, bits, signed, device)


def moment_keys(name: str) -> tuple[str, ...]:
    """Every state key moment `name` can occupy (fp32, or states8bit's codes + absmax)."""
    return (name, name + "_q_int8", name + "_q_uint8", name + "_absmax")


def reset_adam_moments(state: dict, shape, bits: int, device) -> None:
    """Zero both moments (keeping `step`), e.g. when a projection's subspace changes."""
    for name, signed in MOMENTS:
        for k in moment_keys(name):
            state.pop(k, None)
        new_moment(state, name, shape, bits, signed, device)


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


@torch.no_grad()
def adam_direction(state: dict, grad: torch.Tensor, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Advance the moments with `grad` (fp32, the state's shape) and return the update direction

        d = m_hat / (sqrt(v_hat) + eps)   with   m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)

    with torch.optim.AdamW's arithmetic (p -= lr * d matches it to float rounding with fp32 states).
    Increments state["step"]."""
    b1, b2 = betas
    state["step"] += 1
    t = float(state["step"])
    m, v = read_moment(state, "exp_avg"), read_moment(state, "exp_avg_sq")
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    write_moment(state, "exp_avg", m)
    write_moment(state, "exp_avg_sq", v)
    bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    return (m / bc1).div_(denom)


def apply_update(p: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """p <- p * (1 - lr * wd) - lr * update (decoupled decay), in fp32 and written back in p's dtype."""
    w = p if p.dtype == torch.float32 else p.float()
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    w.add_(update, alpha=-lr)
    if w is not p:
        p.copy_(w)


def adamw_step(state: dict, p: torch.Tensor, group: dict) -> None:
    """One AdamW step of `p` from p.grad (torch.optim.AdamW's arithmetic; 8-bit moments if
    group["state_bits"] == 8). group: lr, betas, eps, weight_decay, state_bits."""
    if "step" not in state:
        init_adam_state(state, p.shape, group["state_bits"], p.device)
    direction = adam_direction(state, p.grad.float(), tuple(group["betas"]), group["eps"])
    apply_update(p, direction, group["lr"], group["weight_decay"])
