"""SparseGPT (Frantar & Alistarh 2023): prune with second-order (OBS) updates of the kept weights, from the
input Hessian H = 2 X X^T / n of the layer's calibration inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.errors import ConfigError
from slimtune.prune.patterns import _check, _lowest
from slimtune.registry import PRUNE_METHODS
from slimtune.schema import config_section, option
from slimtune.technique import Technique


@config_section("sparsegpt")
@dataclass(frozen=True)
class SparseGPTConfig:
    """prune.method=sparsegpt's options."""

    blocksize: int = option("columns per lazy-update block", 128)
    percdamp: float = option("dampening of the Hessian, a fraction of its mean diagonal", 0.01)


def _compute_dtype(W: torch.Tensor, H: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (exactness tests)."""
    return torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H) (H is damped in place)."""
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"SparseGPT: the input Hessian is not positive definite after damping "
            f"(percdamp={percdamp}); raise percdamp or use more calibration samples"
        ) from e


def _block_quota(total: int, cols: int, start: int, end: int) -> int:
    """How many of `total` prunings fall in columns [start, end): floor(total * end / cols) -
    floor(total * start / cols); the quotas of all blocks add up to `total` exactly."""
    return total * end // cols - total * start // cols


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    scope: str = "row",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, IST-DASLab/sparsegpt `fasterprune`): prune W and update the kept
    weights to compensate, with H = 2 X X^T / n (in, in) of the layer's calibration inputs.

    Returns (W_new in W's dtype with pruned entries exactly 0, keep-mask). Columns go left to right in
    blocks of `blocksize`; each pruned weight's error is spread over the later columns of its row through
    the rows of Hinv = chol(H^-1)^T (upper), within a block at once and into later blocks lazily.

    Mask choice (unstructured), per block on the weights as updated so far, by w^2 / [Hinv]_jj^2: the
    reference takes one threshold over the whole block; here each block gets a fixed share of the total
    (floor(K * end / in) - floor(K * start / in)), so the target count is met exactly: K =
    int(sparsity * in) per row for scope="row" (selected within each row), K = int(sparsity * numel) for
    scope="layer" (selected over the block's rows together, like the reference). N:M: at each m-th column
    the m - n lowest of the group's m columns per row (blocksize rounded down to a multiple of m).
    A given `mask` (True = kept) is used as is.
    Dead inputs (H_jj == 0) get H_jj = 1 and W[:, j] = 0. Computed in fp32 (fp64 for fp64 inputs).
    """
    _check(W, sparsity, nm, scope)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({cols}, {cols})")
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(W.shape)}")
    if nm is not None:  # an N:M group must not straddle two blocks
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    dtype = _compute_dtype(W, H)
    Wf = W.detach().to(dtype=dtype, copy=True)
    H = H.detach().to(device=W.device, dtype=dtype, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wf[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp)
    del H
    keep = torch.ones(W.shape, dtype=torch.bool, device=W.device) if mask is None else mask.clone().bool()
    k_total = int(sparsity * cols) if scope == "row" else int(sparsity * Wf.numel())
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        keep1 = keep[:, i1:i2]  # a view: selections below write into `keep`
        if mask is None and nm is None:
            scores = W1.square() / d1.square().unsqueeze(0)
            k = _block_quota(k_total, cols, i1, i2)
            if scope == "row":
                keep1.scatter_(1, _lowest(scores, k), False)
            else:
                flat = torch.ones(scores.numel(), dtype=torch.bool, device=W.device)
                flat[_lowest(scores.reshape(-1), k)] = False
                keep1.copy_(flat.view_as(keep1))
        for i in range(i2 - i1):
            if mask is None and nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = W1[:, i : i + m].square() / d1[i : i + m].square().unsqueeze(0)
                keep1[:, i : i + m].scatter_(1, _lowest(scores, m - n), False)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            err = (w - q) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)  # OBS update of this block's rest
            W1[:, i] = q
            Err1[:, i] = err
        Wf[:, i1:i2] = W1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the later blocks
    Wf[~keep] = 0
    return Wf.to(W.dtype), keep


@torch.no_grad()
def exact_obs_prune(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exact constrained least-squares update for a fixed keep-mask: per row, minimise
    (w - w') H (w - w')^T with w'_pruned = 0, i.e. w'_K = w_K + H_KK^-1 H_KP w_P (in H's dtype).
    A reference for tests (one solve per row: slow for large matrices)."""
    out = torch.zeros(W.shape, dtype=H.dtype, device=W.device)
    Wd = W.to(H.dtype)
    for r in range(W.shape[0]):
        K, P = mask[r], ~mask[r]
        if not K.any():
            continue
        rhs = H[K][:, P] @ Wd[r, P]
        out[r, K] = Wd[r, K] + torch.linalg.solve(H[K][:, K], rhs)
    return out


@PRUNE_METHODS.register("sparsegpt")
class SparseGPT(Technique):
    section = "sparsegpt"
    statistic = "hessian"  # (in, in): 2 X X^T / n, accumulated as the reference does

    @staticmethod
    def prune(W: torch.Tensor, stat, sparsity: float, nm, scope: str, options: SparseGPTConfig | None) -> None:
        options = options or SparseGPTConfig()
        W_new, _ = sparsegpt_prune(
            W, stat, sparsity, nm, blocksize=options.blocksize, percdamp=options.percdamp, scope=scope
        )
        W.copy_(W_new)

    @classmethod
    def validate(cls, cfg) -> None:
        s = cfg.sparsegpt
        if s.blocksize < 1:
            raise ConfigError(f"sparsegpt.blocksize={s.blocksize} must be >= 1")
        if not 0 <= s.percdamp < 1:
            raise ConfigError(f"sparsegpt.percdamp={s.percdamp} must be in [0, 1)")
