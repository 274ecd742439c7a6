"""AdamW with Adam run in a low-rank projection of each 2-D gradient (the base of GaLore and DCT).

For a low-rank parameter W (m, n) with gradient G and a projection P with orthonormal rows/columns:

    right side:  P (r, n),  R = G @ P.T (m, r),  update = scale * N @ P
    left side:   P (m, r),  R = P.T @ G (r, n),  update = scale * P @ N
    N = adam_direction(R)   (Adam moments live in R's shape: (m, r) or (r, n))
    W <- W * (1 - lr * wd) - lr * update

P is recomputed from the current G at step 0 and then every `update_gap` steps by the subclass hook
`compute_projection`. Parameters that are not 2-D, and groups with `"lowrank": False` (embeddings,
lm_head, norms, biases), get plain AdamW from adam_core (torch.optim.AdamW's arithmetic).

Under DDP the gradient is already all-reduced when step() runs, so every rank computes the same P as
long as the projection uses deterministic ops only (no global RNG).
"""

from __future__ import annotations

import time

import torch

from slimtune.optim.memory import (
    STEP_BYTES,
    STEP_RATE,
    adam_state_bytes,
    adam_step_bytes,
    is_lowrank,
    lowrank_step_bytes,
    moment_bytes,
    projection_bytes,
)

from slimtune.optim.adam_core import (
    adam_direction,
    adamw_step,
    apply_update,
    init_adam_state,
    keep_saved_dtypes,
    reset_adam_moments,
)

PROJ_TYPES = ("std", "left", "right")


# storage of P (used in fp32): bfloat16 halves it, as galore-torch does when it trains in bf16; int8
# quarters it (Q-GaLore's quantized projection): one absmax per basis vector, linear codes in [-127, 127]
PROJ_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def store_projection(state: dict, proj_dtype: str, side: str) -> None:
    """Replace the fresh fp32 state["proj"] by its stored form: cast to float32 / bfloat16, or int8 codes
    "proj_q_int8" + fp32 "proj_scale", one per basis vector: rows of a right-side (r, n) P, columns of a
    left-side (m, r) P."""
    if proj_dtype != "int8":
        state["proj"] = state["proj"].to(PROJ_DTYPES[proj_dtype])
        return
    proj = state.pop("proj").float()
    dim = 1 if side == "right" else 0  # reduce along each basis vector
    scale = proj.abs().amax(dim=dim, keepdim=True).clamp_min(1e-30) / 127
    state["proj_q_int8"] = torch.round(proj / scale).to(torch.int8)
    state["proj_scale"] = scale


def load_projection(state: dict) -> torch.Tensor:
    """P in fp32, from whichever form store_projection left."""
    if "proj_q_int8" in state:
        return state["proj_q_int8"].float() * state["proj_scale"]
    return state["proj"].float()


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """ "left" or "right" for a (m, n) gradient; "std" (GaLore) projects the smaller dimension away:
    right when m >= n (moments (m, r)), else left (moments (r, n))."""
    if proj_type == "std":
        return "right" if shape[0] >= shape[1] else "left"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def projected_state_bytes(optim, options, name: str, shape, index_bytes: int | None = None) -> int:
    """Memory term (optim/memory.py) of GaLore / DCT: moments in the projected shape + step + P (index_bytes:
    DCT keeps r int64 indices instead of P); tensors that are not projected keep Adam's."""
    if not is_lowrank(optim, name, shape):
        return adam_state_bytes(optim, options, name, shape)
    side = projection_side(tuple(shape), options.proj_type)
    r = min(options.rank, *shape)
    state = moment_bytes(projected_shape(tuple(shape), r, side), optim.state_bits, 2) + STEP_BYTES
    if index_bytes is not None:
        return state + index_bytes * r
    return state + projection_bytes(r, shape[1] if side == "right" else shape[0], options.proj_dtype)


def projected_step_bytes(optim, options, name: str, shape) -> float:
    if not is_lowrank(optim, name, shape):
        return adam_step_bytes(optim, options, name, shape)
    return lowrank_step_bytes(optim, STEP_RATE["projected"], min(options.rank, *shape), shape)


def projected_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    return (shape[0], rank) if side == "right" else (rank, shape[1])


def project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """grad (m, n) -> (m, r) with proj (r, n) on the right, or (r, n) with proj (m, r) on the left."""
    return grad @ proj.T if side == "right" else proj.T @ grad


def project_back(low: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """Back to (m, n): low (m, r) @ proj (r, n) on the right, proj (m, r) @ low (r, n) on the left."""
    return low @ proj if side == "right" else proj @ low


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW with low-rank projected moments for 2-D parameters; subclasses define `compute_projection`.

    Group keys (all may be set per group): lr, betas, eps, weight_decay, rank, update_gap, scale,
    proj_type ("std" | "left" | "right"), state_bits (32 | 8), lowrank (default True: applies to 2-D
    params only), reset_moments_on_update (zero the moments when P changes; GaLore keeps them).
    `projection_seconds` accumulates the wall time spent computing projections."""

    reset_moments_on_update = False

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        state_bits: int = 32,
        reset_moments_on_update: bool | None = None,
        proj_dtype: str = "float32",
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if rank < 1 or update_gap < 1:
            raise ValueError(f"rank and update_gap must be >= 1, got {rank}, {update_gap}")
        projection_side((1, 1), proj_type)  # validates proj_type
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits}")
        if proj_dtype not in PROJ_DTYPES:
            raise ValueError(f"proj_dtype must be one of {', '.join(PROJ_DTYPES)}, got {proj_dtype!r}")
        if reset_moments_on_update is None:
            reset_moments_on_update = self.reset_moments_on_update
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_gap=update_gap,
            scale=scale,
            proj_type=proj_type,
            state_bits=state_bits,
            lowrank=True,
            reset_moments_on_update=bool(reset_moments_on_update),
            proj_dtype=proj_dtype,
        )
        super().__init__(params, defaults)
        self.projection_seconds = 0.0

    # --- projection hooks -------------------------------------------------------------------------

    def compute_projection(self, grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        """grad (m, n) fp32 -> P: (r, n) for side "right", (m, r) for "left", orthonormal rows/columns."""
        raise NotImplementedError(f"{type(self).__name__} must define compute_projection")

    def new_projection(self, state: dict, grad: torch.Tensor, rank: int, side: str) -> None:
        """Compute P for `grad` and keep it in `state` (as tensors, so state_dict round-trips)."""
        state["proj"] = self.compute_projection(grad, rank, side)

    def projection(self, state: dict, shape: tuple[int, int], side: str) -> torch.Tensor:
        """The current P (fp32) of a parameter of `shape` (m, n)."""
        return load_projection(state)

    # --- step -------------------------------------------------------------------------------------

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
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if group["lowrank"] and p.dim() == 2:
                    self._lowrank_step(p, group)
                else:
                    adamw_step(self.state[p], p, group)
        return loss

    def _lowrank_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        grad = p.grad.float()
        shape = tuple(grad.shape)
        side = projection_side(shape, group["proj_type"])
        rank = min(group["rank"], *shape)
        low_shape = projected_shape(shape, rank, side)
        fresh = "step" not in state
        if fresh:
            init_adam_state(state, low_shape, group["state_bits"], p.device, p.dim())
        if fresh or int(state["step"]) % group["update_gap"] == 0:
            start = time.perf_counter()
            self.new_projection(state, grad, rank, side)
            if "proj" in state:  # stored P (GaLore); DCT keeps indices only
                store_projection(state, group["proj_dtype"], side)
            self.projection_seconds += time.perf_counter() - start
            if not fresh and group["reset_moments_on_update"]:
                reset_adam_moments(state, low_shape, group["state_bits"], p.device, p.dim())
        proj = self.projection(state, shape, side)
        direction = adam_direction(state, project(grad, proj, side), group["betas"], group["eps"])
        update = project_back(direction, proj, side).mul_(group["scale"])
        apply_update(p, update, group["lr"], group["weight_decay"])

    # --- checkpoints ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep_saved_dtypes(self, state_dict)  # torch would cast codes / indices / fp32 moments
