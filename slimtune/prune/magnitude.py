"""Magnitude pruning: the smallest |W_ij| go (no calibration data)."""

from __future__ import annotations

import torch

from slimtune.prune.patterns import mask_from_scores
from slimtune.registry import PRUNE_METHODS
from slimtune.technique import Technique


def magnitude_mask(
    W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: str = "row"
) -> torch.Tensor:
    """Prune the smallest |W_ij|."""
    return mask_from_scores(W.detach().float().abs(), sparsity, nm, scope)


@PRUNE_METHODS.register("magnitude")
class Magnitude(Technique):
    section = None
    statistic = None  # needs no calibration inputs

    @staticmethod
    def prune(W: torch.Tensor, stat, sparsity: float, nm, scope: str, options) -> None:
        W.masked_fill_(~magnitude_mask(W, sparsity, nm, scope), 0)
