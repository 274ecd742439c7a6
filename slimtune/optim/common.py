"""What every optimizer builder shares: Adam's keyword arguments, the low-rank param groups, LoRA+ grouping, lr."""

from __future__ import annotations

from slimtune.registry import OPTIONS
from slimtune.technique import Technique


def adam_kwargs(optim) -> dict:
    """optim: the optim section (betas, eps, weight_decay)."""
    return {"betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}


def lowrank_groups(optim, named) -> list[dict]:
    """[{"params": 2-D weights, "lowrank": True}, {"params": the rest, "lowrank": False}] (empty ones dropped):
    optim.full_rank_modules (name suffixes) stay on plain AdamW, as GaLore does."""
    low, plain = [], []
    for name, p in named:
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        (low if p.dim() == 2 and module not in optim.full_rank_modules else plain).append(p)
    return [g for g in ({"params": low, "lowrank": True}, {"params": plain, "lowrank": False}) if g["params"]]


def set_lr(optimizer, lr: float) -> None:
    """The schedule's lr on every param group, times the group's "lr_scale" (LoRA+'s lora_B groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lora_plus(optimizer, named, ratio: float, lr: float):
    """LoRA+ (Hayou et al. 2024) grouped as PEFT's create_loraplus_optimizer does: lora_B factors and 1-D
    parameters (DoRA's magnitude) go to a copy of their param group whose lr is ratio x the schedule's
    ("lr_scale"); every other group gets lr_scale 1. ratio 0: off, the optimizer is returned unchanged."""
    if not ratio:
        return optimizer
    fast = {id(p) for n, p in named if "lora_B" in n or p.dim() == 1}
    for group in list(optimizer.param_groups):
        group["lr_scale"] = 1.0
        moved = [p for p in group["params"] if id(p) in fast]
        if len(moved) == len(group["params"]):  # nothing to split (in_backward: one parameter per group)
            group["lr_scale"] = ratio if moved else 1.0
            continue
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in fast]
            optimizer.add_param_group(
                {**{k: v for k, v in group.items() if k != "params"}, "params": moved, "lr_scale": ratio}
            )
    set_lr(optimizer, lr)
    return optimizer


@OPTIONS.register("optim.lora_plus_ratio")
class LoRAPlus(Technique):
    """optim.lora_plus_ratio>0: lora_B (and DoRA's magnitude) at lr x ratio, in slimtune's own optimizer."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.optim.lora_plus_ratio > 0

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"lora_factors"}

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"streamable"}
