"""Pruning masks and SparseGPT on one weight matrix W (out, in).

Conventions shared by every function here:
* a mask is a bool tensor shaped like W, True = kept;
* `sparsity` is the fraction pruned; scope="row" prunes exactly int(sparsity * in) weights in each
  output row (floor), scope="layer" prunes exactly int(sparsity * out * in) over the whole matrix;
* N:M (`nm=(n, m)`) keeps the n largest scores in each group of m consecutive inputs of a row (m - n
  pruned per group; `sparsity` and `scope` are then ignored); in_features must be a multiple of m;
* the lowest scores are pruned; ties go by a stable ascending sort, so among equal scores the lower
  index (row-major for scope="layer") is pruned first. Deterministic on every device.
"""

from __future__ import annotations

import torch

PATTERNS = "'unstructured', '2:4' or '4:8' (any 'n:m' with 0 < n < m)"
SCOPES = ("row", "layer")


def parse_pattern(pattern) -> tuple[int, int] | None:
    """'unstructured' -> None, 'n:m' -> (n, m). PyYAML 1.1 reads an unquoted 2:4 as the base-60 int
    2*60+4 = 124 (and 4:8 as 248): an int is mapped back as n = p // 60, m = p % 60."""
    if isinstance(pattern, bool):
        raise ValueError(f"prune pattern {pattern!r}: expected {PATTERNS}")
    if isinstance(pattern, int):
        n, m = divmod(pattern, 60)
    elif isinstance(pattern, str) and pattern.strip().lower() == "unstructured":
        return None
    elif isinstance(pattern, str) and pattern.count(":") == 1:
        try:
            n, m = (int(part) for part in pattern.split(":"))
        except ValueError:
            raise ValueError(f"prune pattern {pattern!r}: expected {PATTERNS}") from None
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(isinstance(v, int) for v in pattern):
        n, m = pattern
    else:
        raise ValueError(f"prune pattern {pattern!r}: expected {PATTERNS}")
    if not 0 < n < m:
        raise ValueError(f"prune pattern {pattern!r} means {n}:{m}; expected {PATTERNS}")
    return n, m


def pattern_name(nm: tuple[int, int] | None) -> str:
    """The inverse of parse_pattern: None -> 'unstructured', (2, 4) -> '2:4'."""
    return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


def _check(W: torch.Tensor, sparsity: float, nm, scope: str) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if scope not in SCOPES:
        raise ValueError(f"prune scope {scope!r}: expected one of {SCOPES}")
    if nm is None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity!r}: expected 0 <= sparsity < 1")
    if nm is not None and W.shape[1] % nm[1]:
        raise ValueError(f"{nm[0]}:{nm[1]} sparsity needs in_features ({W.shape[1]}) divisible by {nm[1]}")


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores along the last dim (stable: the lower index first on ties)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                     scope: str = "row") -> torch.Tensor:
    """Keep-mask that prunes the lowest `scores` (out, in) under the module's conventions."""
    _check(scores, sparsity, nm, scope)
    out_f, in_f = scores.shape
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if nm is not None:
        n, m = nm
        groups = scores.reshape(out_f, in_f // m, m)
        mask.view(out_f, in_f // m, m).scatter_(2, _lowest(groups, m - n), False)
    elif scope == "row":
        mask.scatter_(1, _lowest(scores, int(sparsity * in_f)), False)
    else:
        mask.view(-1)[_lowest(scores.reshape(-1), int(sparsity * scores.numel()))] = False
    return mask


def magnitude_mask(W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                   scope: str = "row") -> torch.Tensor:
    """Prune the smallest |W_ij|."""
    return mask_from_scores(W.detach().float().abs(), sparsity, nm, scope)


def wanda_mask(W: torch.Tensor, x_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
               scope: str = "row") -> torch.Tensor:
    """Wanda (Sun et al. 2023): prune the smallest |W_ij| * ||X_j||_2, where x_norm (in,) is the 2-norm of
    input feature j over the calibration tokens."""
    if x_norm.shape != (W.shape[1],):
        raise ValueError(f"x_norm has shape {tuple(x_norm.shape)}, expected ({W.shape[1]},)")
    scores = W.detach().float().abs() * x_norm.to(W.device, torch.float32).unsqueeze(0)
    return mask_from_scores(scores, sparsity, nm, scope)


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
        raise ValueError(f"SparseGPT: the input Hessian is not positive definite after damping "
                         f"(percdamp={percdamp}); raise percdamp or use more calibration samples") from e


def _block_quota(total: int, cols: int, start: int, end: int) -> int:
    """How many of `total` prunings fall in columns [start, end): floor(total * end / cols) -
    floor(total * start / cols); the quotas of all blocks add up to `total` exactly."""
    return total * end // cols - total * start // cols


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01, scope: str = "row",
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
                scores = W1[:, i:i + m].square() / d1[i:i + m].square().unsqueeze(0)
                keep1[:, i:i + m].scatter_(1, _lowest(scores, m - n), False)
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
