"""Pruning patterns and masks on one weight matrix W (out, in), shared by the methods (one file each).

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


def mask_from_scores(
    scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: str = "row"
) -> torch.Tensor:
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
