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
import math

import torch

from slimtune.optim.projected import ProjectedAdamW

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
