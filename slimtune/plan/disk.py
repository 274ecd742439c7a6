"""`slimtune plan`'s disk figures: what a run writes at most, from the counts the memory plan uses.

  offload.store       the offload engine's live store (engines/offload/rundir.store_terms: the figure its
                      free-space check asks for), every rank's
  offload.snapshots   what checkpoint.keep snapshots can pin besides (hard links: a trained tensor's old version)
  checkpoints         the other engines' checkpoints: trained weights + optimizer state, checkpoint.keep of them
  final               final/ (full fine-tuning: the master weights; an adapter; a quantized checkpoint)

A resume needs no more free disk than the run it continues: the store's check subtracts what the run's
directory already holds (rundir.bytes_held), and a checkpoint is written before the oldest is pruned.
"""

from __future__ import annotations

from slimtune.engines.offload.rundir import checkpoints_kept, store_terms
from slimtune.engines.offload.settings import offload_active
from slimtune.formats.final import final_format
from slimtune.plan.arch import Arch
from slimtune.plan.optimizer import state_bytes
from slimtune.plan.weights import Weights


def disk_bytes(cfg, arch: Arch, w: Weights, world: int) -> dict[str, int]:
    """Component -> bytes at most, and "total"."""
    trainable = sum(t.numel for t in w.trainable)
    keep = checkpoints_kept(cfg)
    out = {}
    if offload_active(cfg):
        live, snapshot = store_terms(cfg, arch.numel, trainable)
        out["offload.store"] = live * world
        out["offload.snapshots"] = snapshot * keep * world
    else:
        # one more than checkpoint.keep while the newest is written (the oldest is pruned after it)
        out["checkpoints"] = (keep + 1 if keep else 0) * (w.trainable_bytes + state_bytes(cfg, w.trainable))
    kind = final_format(cfg).kind
    if kind == "full":
        out["final"] = arch.numel * w.master
    elif kind == "quantized":
        out["final"] = sum(w.quantized.values()) + w.frozen_bytes + w.trainable_bytes
    else:
        out["final"] = w.trainable_bytes
    out["total"] = sum(out.values())
    return out


def disk_line(disk: dict[str, int], cfg) -> str:
    """One line for plan's table."""
    parts = ", ".join(f"{k} {size(v)}" for k, v in disk.items() if k != "total" and v)
    where = "output_dir" + (f" + offload.dir ({cfg.offload.dir})" if cfg.offload.dir else "")
    return (
        f"disk ({where}): {parts or 'nothing'}: {size(disk['total'])} at most "
        f"(checkpoints kept: {checkpoints_kept(cfg)}); a resume needs no more free disk than that, less what the "
        "run's directory already holds"
    )


def size(n: int) -> str:
    """Bytes in GB (or MB below 1 GB), as df prints them."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_disk(disk: dict[str, int], budget: int) -> str | None:
    """None when the run's disk fits `budget` (--disk), else the reason, naming both figures."""
    if disk["total"] <= budget:
        return None
    return f"the run writes up to {size(disk['total'])}, above the disk budget of {size(budget)}"
