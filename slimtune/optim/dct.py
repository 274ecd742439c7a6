"""DCT-projected AdamW: GaLore without the SVD ("SVD-free low-rank adaptive gradient optimization").

Instead of the gradient's singular vectors, P is r basis vectors of the orthonormal DCT-II basis,
chosen per parameter as the r vectors that capture the most of the current gradient G (m, n):

    right side: scores_k = ||G @ D[k]||  (norm of column k of G @ D.T),  P = D[idx]     (r, n)
    left side:  scores_k = ||D[k] @ G||  (norm of row k of D @ G),       P = D[idx].T   (m, r)

D (n, n) is fixed, so it is built once per (size, device) and shared by every parameter; each
parameter stores only its r chosen indices (int64) instead of an (r, n) fp32 matrix. Choosing costs
one matmul (m * n * n) and a top-k instead of an SVD.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import math

import torch

from slimtune.optim.projected import ProjectedAdamW, projected_state_bytes, projected_step_bytes
from slimtune.errors import ConfigError
from slimtune.optim.common import adam_kwargs, lowrank_groups
from slimtune.optim.memory import is_lowrank
from slimtune.registry import OPTIMIZERS
from slimtune.schema import config_section, option
from slimtune.technique import declares


@config_section("dct")
@dataclass(frozen=True)
class DCTConfig:
    """optim.name=dct's options."""

    rank: int = option("rank of the gradient projection (clamped to min(m, n))", 128, fixed=True)
    update_gap: int = option("steps between projection updates", 200)
    scale: float = option("scale of the back-projected update", 0.25)
    proj_type: str = option("std (smaller side) | left | right", "std", ("std", "left", "right"), fixed=True)


DCT_CACHE_SIZE = 8  # distinct (n, device) kept: a model has a few matrix sides; D of n=8192 is 256 MB


def dct_matrix(n: int, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n), rows are basis vectors (D @ D.T = I):

        D[k, j] = sqrt(2/n) * c_k * cos(pi * (2j + 1) * k / (2n)),  c_0 = 1/sqrt(2), c_k = 1 otherwise.

    Cached per (n, device), least recently used first out beyond DCT_CACHE_SIZE; callers must not modify it."""
    return _dct_matrix(n, str(torch.device(device if device is not None else "cpu")))


@functools.lru_cache(maxsize=DCT_CACHE_SIZE)
def _dct_matrix(n: int, device: str) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=torch.float32)


def dct_indices(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """grad (m, n) -> int64 (rank,): the DCT basis vectors with the largest gradient energy, ascending.

    Ascending order (not by score) keeps a moment slot tied to the same frequency when a refresh picks
    the same set again."""
    grad = grad.float()
    if side == "right":
        scores = torch.linalg.vector_norm(grad @ dct_matrix(grad.shape[1], grad.device).T, dim=0)
    else:
        scores = torch.linalg.vector_norm(dct_matrix(grad.shape[0], grad.device) @ grad, dim=1)
    return torch.topk(scores, rank).indices.sort().values


def dct_projection(indices: torch.Tensor, size: int, side: str, device=None) -> torch.Tensor:
    """P from chosen indices (r,): D[indices] (r, size) for side "right", its transpose (size, r) for "left"."""
    rows = dct_matrix(size, device).index_select(0, indices.to(device))
    return rows if side == "right" else rows.T


class DCTAdamW(ProjectedAdamW):
    """ProjectedAdamW with a DCT basis projection (see ProjectedAdamW for the arguments).

    State per low-rank parameter: `proj_index` int64 (r,) plus the moments; P is rebuilt each step."""

    def compute_projection(self, grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        size = grad.shape[1] if side == "right" else grad.shape[0]
        return dct_projection(dct_indices(grad, rank, side), size, side, grad.device)

    def new_projection(self, state: dict, grad: torch.Tensor, rank: int, side: str) -> None:
        state["proj_index"] = dct_indices(grad, rank, side)

    def projection(self, state: dict, shape: tuple[int, int], side: str) -> torch.Tensor:
        index = state["proj_index"]
        return dct_projection(index, shape[1] if side == "right" else shape[0], side, index.device)


def _validate_dct(cfg) -> None:
    o = cfg.dct
    for key in ("rank", "update_gap"):
        if getattr(o, key) <= 0:
            raise ConfigError(f"dct.{key}={getattr(o, key)} must be > 0")
    if o.scale <= 0:
        raise ConfigError(f"dct.scale={o.scale} must be > 0")


def _dct_state_bytes(optim, options, name, shape) -> int:
    return projected_state_bytes(optim, options, name, shape, index_bytes=8)  # proj_index int64


def _dct_cache_bytes(optim, options, tensors) -> int:
    """The orthonormal DCT basis (n, n) fp32 per distinct projected side, cached (the 8 largest)."""
    sides = {
        shape[1] if shape[0] >= shape[1] else shape[0] for name, shape in tensors if is_lowrank(optim, name, shape)
    }
    return sum(4 * s * s for s in sorted(sides)[-8:])


@OPTIMIZERS.register("dct")
@declares(
    requires={"whole_matrices"},
    validate=_validate_dct,
    section="dct",
    state_bytes=_dct_state_bytes,
    step_bytes=projected_step_bytes,
    cache_bytes=_dct_cache_bytes,
)
def build_dct(optim, options, named, lr):
    return DCTAdamW(
        lowrank_groups(optim, named),
        lr=lr,
        rank=options.rank,
        update_gap=options.update_gap,
        scale=options.scale,
        proj_type=options.proj_type,
        state_bits=optim.state_bits,
        proj_dtype=getattr(options, "proj_dtype", "float32"),
        **adam_kwargs(optim),
    )
