"""Wanda (Sun et al. 2023): prune by |W_ij| times the 2-norm of input feature j over the calibration tokens."""

from __future__ import annotations

import torch

from slimtune.prune.patterns import mask_from_scores
from slimtune.registry import PRUNE_METHODS
from slimtune.technique import Technique


def wanda_mask(
    W: torch.Tensor, x_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: str = "row"
) -> torch.Tensor:
    """Wanda (Sun et al. 2023): prune the smallest |W_ij| * ||X_j||_2, where x_norm (in,) is the 2-norm of
    input feature j over the calibration tokens."""
    if x_norm.shape != (W.shape[1],):
        raise ValueError(f"x_norm has shape {tuple(x_norm.shape)}, expected ({W.shape[1]},)")
    scores = W.detach().float().abs() * x_norm.to(W.device, torch.float32).unsqueeze(0)
    return mask_from_scores(scores, sparsity, nm, scope)


@PRUNE_METHODS.register("wanda")
class Wanda(Technique):
    section = None
    statistic = "sq_norms"  # (in,): the sum over calibration tokens of x_j^2

    @staticmethod
    def prune(W: torch.Tensor, stat, sparsity: float, nm, scope: str, options) -> None:
        W.masked_fill_(~wanda_mask(W, stat.sqrt(), sparsity, nm, scope), 0)
