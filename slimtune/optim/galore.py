"""GaLore (Zhao et al. 2024): Adam in the span of the gradient's top-r singular vectors.

P comes from the SVD of the current gradient G (m, n) = U S Vh: the top-r right singular vectors
Vh[:r] (r, n) on the right side, or the top-r left ones U[:, :r] (m, r) on the left. The moments
are kept when P is refreshed (as in galore-torch). torch.linalg.svd is deterministic, so DDP ranks,
which all see the same all-reduced G, agree on P.
"""

from __future__ import annotations

import torch

from slimtune.optim.projected import ProjectedAdamW


def svd_projection(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """grad (m, n) -> P: Vh[:rank] (rank, n) for side "right", U[:, :rank] (m, rank) for "left"."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    proj = Vh[:rank] if side == "right" else U[:, :rank]
    return proj.clone(memory_format=torch.contiguous_format)  # a view would keep all of U or Vh alive


class GaLoreAdamW(ProjectedAdamW):
    """ProjectedAdamW with GaLore's SVD projection (see ProjectedAdamW for the arguments)."""

    def compute_projection(self, grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        return svd_projection(grad, rank, side)
