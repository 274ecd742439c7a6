"""FRUGAL: full-rank updates by gradient splitting (Zmushko et al., ICML 2025, arXiv:2411.07837).

Each low-rank parameter W (m, n) splits its gradient G into a state-full part in a subspace S of
density `density` and the state-free residual, updated with AdamW and signSGD respectively:

    G_S = project(G)                  (the subspace's shape: (m, k), (k, n) or (k,))
    D   = adam_direction(G_S)         (Adam moments live in G_S's shape)
    R   = G - back(G_S)               (G's component outside S)
    W  <- W * (1 - lr * wd) - lr * (back(D) + inactive_lr_scale * sign(R))

Subspaces (`subspace`), after the paper's three families and the authors' code (frugal/ in their
repository: GaLoreProjector, CoordinateProjector, BlockOptimizer):

    "svd"          top-r singular vectors of G, r = round(density * min(m, n)); GaLore's "std" side:
                   right (P (r, n), G_S = G @ P.T (m, r)) when m >= n, else left (P (m, r), G_S = P.T @ G).
    "random"       the same shapes with a random orthonormal P (QR of a Gaussian matrix).
    "blocks"       ceil(density * n) random whole columns when m >= n, else ceil(density * m) rows: the
                   official CoordinateProjector's "columns"/"rows" choice; moments (m, k) or (k, n).
    "coordinates"  round(density * m * n) random entries (official "randk"); moments (k,), the choice is
                   kept as a bit-packed mask (m * n / 8 bytes) rather than indices (4-8 bytes each).
    "modules"      whole parameters (official BlockOptimizer, BAdam-like; the paper's main setting):
                   round(density * count) of a group's 2-D parameters get AdamW with full-size moments,
                   the others signSGD and no state at all.

The subspace is chosen at a parameter's first step and every `update_gap` steps after. On every
reselection the Adam moments are zeroed and Adam's step counter restarts (so does bias correction), as
the official code does by default (`reset_statistics=True`; the moments are not projected into the new
subspace). Consequently at density 1 "blocks", "coordinates" and "modules" equal torch.optim.AdamW up
to the first reselection; "svd"/"random" at full rank run Adam in a rotated basis, which is not AdamW
(Adam's elementwise second moment is not rotation invariant). A whole-space subspace has no residual
(its sign would be the sign of rounding noise).

Randomness comes from a torch.Generator on the parameter's device seeded from (seed, the parameter's
step at the reselection, its index in the optimizer) ("modules": the group's index), never from the
global RNG: under torchrun every rank sees the same all-reduced gradient and picks the same subspace.

Groups with `"lowrank": False` (embeddings, lm_head, norms, biases) and parameters that are not 2-D get
plain AdamW from adam_core (torch.optim.AdamW's arithmetic). Parameters of any float dtype are updated
in fp32 and written back in their dtype. `projection_seconds` accumulates subspace-selection time.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch

from slimtune.optim.adam_core import (
    adam_direction,
    adamw_step,
    apply_update,
    init_adam_state,
    keep_saved_dtypes,
    reset_adam_moments,
)
from slimtune.optim.projected import PROJ_DTYPES, load_projection, store_projection
from slimtune.errors import ConfigError
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
from slimtune.optim.common import adam_kwargs, lowrank_groups
from slimtune.registry import OPTIMIZERS
from slimtune.schema import config_section, option
from slimtune.technique import declares

SUBSPACES = ("svd", "random", "blocks", "coordinates", "modules")


@config_section("frugal")
@dataclass(frozen=True)
class FrugalConfig:
    """optim.name=frugal's options."""

    density: float = option("fraction of each matrix updated state-full (AdamW)", 0.25, fixed=True)
    subspace: str = option(
        "svd | random | blocks (rows/columns) | coordinates | modules (whole params)",
        "svd",
        ("svd", "random", "blocks", "coordinates", "modules"),
        fixed=True,
    )
    update_gap: int = option("steps between subspace updates", 200)
    inactive_lr_scale: float = option("lr multiplier of the state-free signSGD part", 1.0)
    proj_dtype: str = option(
        "svd / random: storage of the projection P: float32 | bfloat16 | int8",
        "float32",
        ("float32", "bfloat16", "int8"),
        fixed=True,
    )
    seed: int = option("seed of the random subspaces (the same on every rank)", 0, fixed=True)


def subspace_generator(seed: int, step: int, tag: str, device) -> torch.Generator:
    """A generator that depends on (seed, step, tag) only, so every rank and every rerun gets the same."""
    digest = hashlib.sha256(f"frugal/{seed}/{step}/{tag}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return gen


def subspace_layout(shape: tuple[int, int], density: float, subspace: str) -> tuple[str, int, int]:
    """(side, k, full) for a (m, n) gradient: side "right" (columns; m >= n), "left" (rows) or "flat"
    (coordinates); k the subspace size along that side; full the size of the whole space there."""
    m, n = shape
    if subspace == "coordinates":
        return "flat", round(density * m * n), m * n
    side, full = ("right", n) if m >= n else ("left", m)
    k = math.ceil(density * full) if subspace == "blocks" else round(density * full)
    return side, min(k, full), full


def low_shape(shape: tuple[int, int], side: str, k: int) -> tuple[int, ...]:
    return {"right": (shape[0], k), "left": (k, shape[1]), "flat": (k,)}[side]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> (ceil(N / 8),) uint8, bit j of byte i = mask[8 i + j]."""
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-mask.numel()) % 8)).view(-1, 8)
    packed = torch.zeros(padded.shape[0], dtype=torch.uint8, device=mask.device)
    for j in range(8):
        packed |= padded[:, j] << j
    return packed


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: (ceil(N / 8),) uint8 -> (N,) bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


def select_subspace(grad: torch.Tensor, subspace: str, side: str, k: int, gen: torch.Generator) -> dict:
    """The state tensors describing a new subspace for `grad` (m, n) fp32: "proj" ((k, n) right,
    (m, k) left; orthonormal), "index" ((k,) int64, sorted columns/rows) or "mask_bits" (packed)."""
    m, n = grad.shape
    dim = n if side == "right" else m
    if subspace == "svd":
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return {"proj": (vh[:k] if side == "right" else u[:, :k]).contiguous()}
    if subspace == "random":
        q, r = torch.linalg.qr(torch.randn(dim, k, generator=gen, device=grad.device))
        q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # Haar-distributed: fix QR's sign ambiguity
        return {"proj": (q.T if side == "right" else q).contiguous()}
    if subspace == "blocks":
        return {"index": torch.randperm(dim, generator=gen, device=grad.device)[:k].sort().values}
    if subspace == "coordinates":
        mask = torch.zeros(m * n, dtype=torch.bool, device=grad.device)
        mask[torch.randperm(m * n, generator=gen, device=grad.device)[:k]] = True
        return {"mask_bits": pack_bits(mask)}
    raise ValueError(f"unknown subspace {subspace!r}")


def split_gradient(grad: torch.Tensor, state: dict, subspace: str, side: str, whole: bool):
    """grad (m, n) -> (G_S in the subspace's shape, residual (m, n) or None when S is the whole space,
    add_back(update, D): update += back(D) in place)."""
    if subspace in ("svd", "random"):
        proj = load_projection(state)
        if side == "right":
            low = grad @ proj.T
            residual = None if whole else grad - low @ proj
            return low, residual, lambda update, d: update.addmm_(d, proj)
        low = proj.T @ grad
        residual = None if whole else grad - proj @ low
        return low, residual, lambda update, d: update.addmm_(proj, d)
    # blocks / coordinates: the residual is zero on the subspace, so writing D there adds it
    if subspace == "blocks":
        index = state["index"]
        selected = (slice(None), index) if side == "right" else (index,)
    else:
        selected = unpack_bits(state["mask_bits"], grad.numel()).view_as(grad)
    residual = None
    if not whole:
        residual = grad.clone()
        residual[selected] = 0

    def add_back(update: torch.Tensor, d: torch.Tensor) -> None:
        update[selected] = d

    return grad[selected], residual, add_back


def _drop_adam_state(state: dict) -> None:
    for key in [k for k in state if k == "step" or k.startswith("exp_avg")]:
        del state[key]


class FRUGAL(torch.optim.Optimizer):
    """AdamW in a subspace of each 2-D gradient plus signSGD on the rest (see the module docstring).

    Group keys (all may be set per group): lr, betas, eps, weight_decay, density, subspace, update_gap,
    inactive_lr_scale, state_bits (32 | 8), seed, lowrank (default True: applies to 2-D params only).

    State of a low-rank parameter: "frugal_step" (int, steps taken), Adam's "step"/"exp_avg"/"exp_avg_sq"
    in the subspace's shape (absent when the subspace is empty), plus "proj", "index", "mask_bits" or
    "active" (bool, "modules") describing the subspace."""

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 0.25,
        subspace: str = "svd",
        update_gap: int = 200,
        inactive_lr_scale: float = 1.0,
        state_bits: int = 32,
        seed: int = 0,
        proj_dtype: str = "float32",
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or inactive_lr_scale < 0:
            raise ValueError(
                f"lr, eps, weight_decay and inactive_lr_scale must be >= 0, got "
                f"{lr}, {eps}, {weight_decay}, {inactive_lr_scale}"
            )
        if proj_dtype not in PROJ_DTYPES:
            raise ValueError(f"proj_dtype must be one of {', '.join(PROJ_DTYPES)}, got {proj_dtype!r}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        if subspace not in SUBSPACES:
            raise ValueError(f"subspace must be one of {SUBSPACES}, got {subspace!r}")
        if update_gap < 1:
            raise ValueError(f"update_gap must be >= 1, got {update_gap}")
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            subspace=subspace,
            update_gap=update_gap,
            inactive_lr_scale=inactive_lr_scale,
            state_bits=state_bits,
            seed=int(seed),
            lowrank=True,
            proj_dtype=proj_dtype,
        )
        super().__init__(params, defaults)
        self.projection_seconds = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # the parameter's position in the optimizer, part of its subspace seed
        for group_index, group in enumerate(self.param_groups):
            # "modules" picks among the group's low-rank parameters: position -> state-full or not
            positions = {id(p): i for i, p in enumerate(q for q in group["params"] if q.dim() == 2)}
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FRUGAL does not support sparse gradients")
                if not (group["lowrank"] and p.dim() == 2):
                    adamw_step(self.state[p], p, group)
                elif group["subspace"] == "modules":
                    self._module_step(p, group, group_index, positions[id(p)], len(positions))
                else:
                    self._split_step(p, group, index)
        return loss

    def _split_step(self, p: torch.Tensor, group: dict, index: int) -> None:
        state, grad = self.state[p], p.grad.float()
        side, k, full = subspace_layout(tuple(grad.shape), group["density"], group["subspace"])
        taken = state.get("frugal_step", 0)
        if taken % group["update_gap"] == 0 and k > 0:
            start = time.perf_counter()
            gen = subspace_generator(group["seed"], taken, f"p{index}", p.device)
            state.update(select_subspace(grad, group["subspace"], side, k, gen))
            if "proj" in state:
                store_projection(state, group["proj_dtype"], side)
            self.projection_seconds += time.perf_counter() - start
            shape = low_shape(tuple(grad.shape), side, k)
            if "step" in state:  # reselection: zero the moments and restart bias correction
                reset_adam_moments(state, shape, group["state_bits"], p.device, p.dim())
                state["step"].zero_()
            else:  # p.dim(): "coordinates" moments are (k,) but belong to a matrix (8-bit when large)
                init_adam_state(state, shape, group["state_bits"], p.device, p.dim())
        state["frugal_step"] = taken + 1
        if k == 0:
            update = grad.sign().mul_(group["inactive_lr_scale"])
        else:
            low, residual, add_back = split_gradient(grad, state, group["subspace"], side, k == full)
            direction = adam_direction(state, low, group["betas"], group["eps"])
            if residual is None:
                update = torch.zeros_like(grad)
            else:
                update = residual.sign_().mul_(group["inactive_lr_scale"])
            add_back(update, direction)
        apply_update(p, update, group["lr"], group["weight_decay"])

    def _module_step(self, p: torch.Tensor, group: dict, group_index: int, position: int, count: int) -> None:
        state = self.state[p]
        taken = state.get("frugal_step", 0)
        if taken % group["update_gap"] == 0:
            start = time.perf_counter()
            gen = subspace_generator(group["seed"], taken, f"g{group_index}", "cpu")
            chosen = torch.randperm(count, generator=gen)[: round(group["density"] * count)]
            state["active"] = bool((chosen == position).any())
            _drop_adam_state(state)  # the official BlockOptimizer re-inits every block on reselection
            if state["active"]:
                init_adam_state(state, p.shape, group["state_bits"], p.device, p.dim())
            self.projection_seconds += time.perf_counter() - start
        state["frugal_step"] = taken + 1
        grad = p.grad.float()
        if state["active"]:
            update = adam_direction(state, grad, group["betas"], group["eps"])
        else:
            update = grad.sign().mul_(group["inactive_lr_scale"])
        apply_update(p, update, group["lr"], group["weight_decay"])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep_saved_dtypes(self, state_dict)  # torch would cast codes / indices / fp32 moments


def _frugal_requires(cfg) -> set[str]:
    # modules: picks whole parameters across the model, so every gradient at once
    return {"whole_matrices"} | ({"gradients_in_memory"} if cfg.frugal.subspace == "modules" else set())


def _validate_frugal(cfg) -> None:
    o = cfg.frugal
    if not 0 <= o.density <= 1:
        raise ConfigError(f"frugal.density={o.density} must be in [0, 1]")
    if o.update_gap <= 0:
        raise ConfigError(f"frugal.update_gap={o.update_gap} must be > 0")
    if o.inactive_lr_scale < 0:
        raise ConfigError(f"frugal.inactive_lr_scale={o.inactive_lr_scale} must be >= 0")


def _frugal_state_bytes(optim, options, name: str, shape) -> int:
    """Moments in the subspace's shape: svd / random (m, k) or (k, n), k = round(density * side), + P; blocks
    k = ceil(density * side) whole columns/rows + k int64 indices; coordinates k = round(density m n) values
    + an m n / 8 byte mask; modules the expected density share of the weights with full moments."""
    if not is_lowrank(optim, name, shape):
        return adam_state_bytes(optim, options, name, shape)
    (m, n), sub, density = shape, options.subspace, options.density
    if sub == "modules":
        return round(density * (moment_bytes((m, n), optim.state_bits, 2) + STEP_BYTES))
    if sub == "coordinates":
        k = round(density * m * n)
        return (moment_bytes((k,), optim.state_bits, 2) + STEP_BYTES if k else 0) + -(-m * n // 8)
    side, full = ("right", n) if m >= n else ("left", m)
    k = min(math.ceil(density * full) if sub == "blocks" else round(density * full), full)
    if k == 0:
        return 0
    low = (m, k) if side == "right" else (k, n)
    extra = 8 * k if sub == "blocks" else projection_bytes(k, full, options.proj_dtype)
    return moment_bytes(low, optim.state_bits, 2) + STEP_BYTES + extra


def _frugal_step_bytes(optim, options, name: str, shape) -> float:
    if not is_lowrank(optim, name, shape):
        return adam_step_bytes(optim, options, name, shape)
    return lowrank_step_bytes(optim, STEP_RATE["frugal"], min(math.ceil(options.density * min(shape)), *shape), shape)


@OPTIMIZERS.register("frugal")
@declares(
    requires=_frugal_requires,
    validate=_validate_frugal,
    section="frugal",
    state_bytes=_frugal_state_bytes,
    step_bytes=_frugal_step_bytes,
)
def build_frugal(optim, options, named, lr):
    return FRUGAL(
        lowrank_groups(optim, named),
        lr=lr,
        density=options.density,
        subspace=options.subspace,
        update_gap=options.update_gap,
        inactive_lr_scale=options.inactive_lr_scale,
        state_bits=optim.state_bits,
        seed=options.seed,
        proj_dtype=options.proj_dtype,
        **adam_kwargs(optim),
    )
