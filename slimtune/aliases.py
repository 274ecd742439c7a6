"""Keys renamed when each technique got its own section: the old names keep working for one release.

`rename(raw)` moves every old key of a raw recipe dict (YAML + overrides) to its new place and returns the
"old -> new" pairs; `load_config` prints them on one line of stderr. Keys that depended on the technique
chosen (optim.rank was GaLore's and DCT's) go to that technique's section; where the chosen technique has no
such key the value was unused, and is dropped.
"""

from __future__ import annotations

import sys

# old key -> new key
MOVED = {
    "adapter.rank": "lora.rank",
    "adapter.alpha": "lora.alpha",
    "adapter.dropout": "lora.dropout",
    "adapter.use_rslora": "lora.use_rslora",
    "adapter.density": "sparse_ft.density",
    "adapter.num_params": "sparse_ft.num_params",
    "adapter.seed": "sparse_ft.seed",
    "optim.momentum": "sgd.momentum",
    "optim.density": "frugal.density",
    "optim.subspace": "frugal.subspace",
    "optim.inactive_lr_scale": "frugal.inactive_lr_scale",
    "optim.seed": "frugal.seed",
    "train.halo_level": "halo.level",
    "train.hadamard_block": "halo.hadamard_block",
    "prune.blocksize": "sparsegpt.blocksize",
    "prune.percdamp": "sparsegpt.percdamp",
    "engine.zero_stage": "deepspeed.zero_stage",
    "engine.nvme_dir": "deepspeed.nvme_dir",
    "engine.config": "deepspeed.config",
}
# old key -> the optimizers whose section took it (the chosen one gets it)
BY_OPTIMIZER = {
    "optim.rank": ("galore", "dct"),
    "optim.update_gap": ("galore", "dct", "frugal"),
    "optim.scale": ("galore", "dct"),
    "optim.proj_type": ("galore", "dct"),
    "optim.proj_dtype": ("galore", "frugal"),
}
# offload.params / offload.optimizer -> engine.name=offload with engine.params / engine.optimizer; DeepSpeed's
# engine.offload=cpu|nvme -> engine.optimizer (and engine.params at ZeRO-3)
PLACEMENT = ("offload.params", "offload.optimizer", "engine.offload")
OLD_KEYS = frozenset(MOVED) | frozenset(BY_OPTIMIZER) | frozenset(PLACEMENT)


def new_key(key: str) -> str:
    """Where an old key's value is typed (the first section that took it)."""
    if key in MOVED:
        return MOVED[key]
    if key in BY_OPTIMIZER:
        return f"{BY_OPTIMIZER[key][0]}.{key.split('.')[1]}"
    return {
        "offload.params": "engine.params",
        "offload.optimizer": "engine.optimizer",
        "engine.offload": "engine.optimizer",
    }.get(key, key)


def _pop(raw: dict, key: str):
    section, name = key.split(".")
    node = raw.get(section)
    if not isinstance(node, dict) or name not in node:
        return None, False
    value = node.pop(name)
    if not node:
        del raw[section]
    return value, True


def _put(raw: dict, key: str, value) -> None:
    section, name = key.split(".")
    node = raw.setdefault(section, {})
    node.setdefault(name, value)  # a new key given too wins over its old name


def _value(raw: dict, context: dict, key: str, default):
    section, name = key.split(".")
    for source in (raw, context):
        node = source.get(section)
        if isinstance(node, dict) and name in node:
            return node[name]
    return default


def rename(raw: dict, context: dict | None = None) -> list[str]:
    """Move the old keys of `raw` (nested dict) to their new places; the "old -> new" it did, in order.
    context: the recipe `raw` overrides, read for optim.name / engine.name / deepspeed.zero_stage when raw
    does not set them."""
    context = context or {}
    done = []
    optimizer = _value(raw, context, "optim.name", "adamw")
    for old, new in MOVED.items():
        value, found = _pop(raw, old)
        if found:
            _put(raw, new, value)
            done.append(f"{old} -> {new}")
    for old, owners in BY_OPTIMIZER.items():
        value, found = _pop(raw, old)
        if found:
            new = f"{optimizer}.{old.split('.')[1]}" if optimizer in owners else None
            if new:
                _put(raw, new, value)
            done.append(
                f"{old} -> {new or '/'.join(f'{o}.' + old.split('.')[1] for o in owners)}"
                + ("" if new else f" (unused with optim.name={optimizer})")
            )
    done += _placement(raw, context)
    return done


def _placement(raw: dict, context: dict) -> list[str]:
    done = []
    engine = _value(raw, context, "engine.name", "ddp")
    for old, new in (("offload.params", "engine.params"), ("offload.optimizer", "engine.optimizer")):
        value, found = _pop(raw, old)
        if found:
            _put(raw, new, value)
            if engine == "ddp" and value not in ("none", None):
                _put(raw, "engine.name", "offload")
                engine = "offload"
            done.append(f"{old} -> {new}" + (" (engine.name=offload)" if engine == "offload" else ""))
    if any(d.startswith("offload.") for d in done) and engine == "offload":
        for key in ("engine.params", "engine.optimizer"):
            _put(raw, key, "none")  # the old keys' default: only what was given goes to disk
    value, found = _pop(raw, "engine.offload")
    if found:
        where = {"nvme": "disk"}.get(value, value)
        _put(raw, "engine.optimizer", where)
        stage = _value(raw, context, "deepspeed.zero_stage", 2)
        if stage == 3 and where != "none":
            _put(raw, "engine.params", where)
        done.append(
            f"engine.offload={value} -> engine.optimizer={where}"
            + (f" engine.params={where}" if stage == 3 and where != "none" else "")
        )
    return done


def print_notice(renamed: list[str]) -> None:
    print(
        f"slimtune: renamed keys (the old names work for one release; recipes use the new): {', '.join(renamed)}",
        file=sys.stderr,
    )
