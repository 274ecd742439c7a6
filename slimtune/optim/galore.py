"""GaLore (Zhao et al. 2024): Adam in the span of the gradient's top-r singular vectors.

P comes from the SVD of the current gradient G (m, n) = U S Vh: the top-r right singular vectors
Vh[:r] (r, n) on the right side, or the top-r left ones U[:, :r] (m, r) on the left. The moments
are kept when P is refreshed (as in galore-torch). torch.linalg.svd is deterministic, so DDP ranks,
which all see the same all-reduced G, agree on P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.optim.projected import ProjectedAdamW, projected_state_bytes, projected_step_bytes
from slimtune.errors import ConfigError
from slimtune.optim.common import adam_kwargs, lowrank_groups
from slimtune.registry import OPTIMIZERS
from slimtune.schema import config_section, option
from slimtune.technique import declares


@config_section("galore")
@dataclass(frozen=True)
class GaLoreConfig:
    """optim.name=galore's options."""

    rank: int = option("rank of the gradient projection (clamped to min(m, n))", 128, fixed=True)
    update_gap: int = option("steps between projection updates", 200)
    scale: float = option("scale of the back-projected update", 0.25)
    proj_type: str = option("std (smaller side) | left | right", "std", ("std", "left", "right"), fixed=True)
    proj_dtype: str = option(
        "storage of the projection P: float32 | bfloat16 | int8", "float32", ("float32", "bfloat16", "int8"), fixed=True
    )


def svd_projection(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """grad (m, n) -> P: Vh[:rank] (rank, n) for side "right", U[:, :rank] (m, rank) for "left"."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    proj = Vh[:rank] if side == "right" else U[:, :rank]
    return proj.clone(memory_format=torch.contiguous_format)  # a view would keep all of U or Vh alive


class GaLoreAdamW(ProjectedAdamW):
    """ProjectedAdamW with GaLore's SVD projection (see ProjectedAdamW for the arguments)."""

    def compute_projection(self, grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        return svd_projection(grad, rank, side)


def _validate_galore(cfg) -> None:
    o = cfg.galore
    for key in ("rank", "update_gap"):
        if getattr(o, key) <= 0:
            raise ConfigError(f"galore.{key}={getattr(o, key)} must be > 0")
    if o.scale <= 0:
        raise ConfigError(f"galore.scale={o.scale} must be > 0")


@OPTIMIZERS.register("galore")
@declares(
    requires={"whole_matrices"},
    validate=_validate_galore,
    section="galore",
    state_bytes=projected_state_bytes,
    step_bytes=projected_step_bytes,
)
def build_galore(optim, options, named, lr):
    return GaLoreAdamW(
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
