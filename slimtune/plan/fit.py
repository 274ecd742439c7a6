"""`slimtune plan ... --fit BUDGET`: the cheapest change of the knobs a user would turn that brings the predicted
peak under the budget.

Knobs, each with a cost (roughly: how much speed or fidelity it gives up), and the candidates tried:
  train.batch_size     halved down to 1, train.grad_accum raised so the global batch stays the same (0.15 per
                       halving: smaller matmuls)
  train.loss_chunk_tokens  a naive loss (0) made chunked, 256 (0.05: no cost to speak of)
  train.activation_checkpointing  true (1.0: ~30% more compute)
  optim.state_bits     8 where the optimizer takes it (0.5: 8-bit moments)
  quant.method         nf4 for an adapter on an unquantized base (2.0: a 4-bit base, slower matmuls on CPU)
  engine.name=offload  engine.optimizer=disk (3.0), engine.params=disk as well (5.0): slimtune's offload engine
  engine.name          with world size > 1: fsdp2 (1.5), deepspeed with deepspeed.zero_stage=3 (2.0)
A candidate the config's rules refuse is skipped, and with --disk BUDGET one that writes more than that
(plan/disk.py: the offload store and its snapshots, checkpoints, final/). Candidates are evaluated cheapest
first; the first whose peak is at most FIT_MARGIN x the budget wins (the margin covers the prediction's error
on the measured runs of benchmarks/plan_accuracy.py).
"""

from __future__ import annotations

import itertools
import math
import re

from slimtune import config as C
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.plan.disk import check_disk
from slimtune.plan.estimate import Plan, plan_memory

FIT_MARGIN = 0.92
UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_budget(text: str, flag: str = "--fit") -> int:
    """'24GiB', '1.5GiB', '800MiB', '2GB', '1073741824' -> bytes (> 0); ConfigError naming `flag` otherwise."""
    m = _BUDGET_RE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        raise ConfigError(f"{flag} {text!r}: not a size; give e.g. 24GiB, 1.5GiB, 800MiB, 60GB or a byte count")
    value = float(m.group(1)) * UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"{flag} {text!r}: the budget must be a positive size, e.g. 24GiB")
    return int(value)


def knob_keys(cfg) -> list[str]:
    """The knobs that apply to cfg, in the order they are printed."""
    keys = ["train.batch_size", "train.grad_accum", "train.activation_checkpointing"]
    if cfg.train.loss_chunk_tokens <= 0:
        keys.append("train.loss_chunk_tokens")
    if _candidate(cfg, {"optim.state_bits": 8}) is not None:
        keys.append("optim.state_bits")
    if cfg.adapter.type != "none":
        keys.append("quant.method")
    return keys + ["engine.name", "engine.params", "engine.optimizer"]


def _choices(cfg, world: int) -> list[list[tuple[dict, float]]]:
    """Per knob group, the alternatives as (overrides, cost); the first alternative is the current setting."""
    t, o = cfg.train, cfg.optim
    groups = []
    global_batch = t.batch_size * t.grad_accum
    batch = [({}, 0.0)]
    b = t.batch_size
    while b > 1:
        b = b // 2
        if global_batch % b == 0:
            batch.append(
                ({"train.batch_size": b, "train.grad_accum": global_batch // b}, 0.15 * math.log2(t.batch_size / b))
            )
    groups.append(batch)
    if t.loss_chunk_tokens <= 0:
        groups.append([({}, 0.0), ({"train.loss_chunk_tokens": 256}, 0.05)])
    if not t.activation_checkpointing:
        groups.append([({}, 0.0), ({"train.activation_checkpointing": True}, 1.0)])
    if o.state_bits == 32:
        groups.append([({}, 0.0), ({"optim.state_bits": 8}, 0.5)])
    if cfg.adapter.type != "none" and cfg.quant.method == "none" and cfg.adapter.init == "default":
        groups.append([({}, 0.0), ({"quant.method": "nf4"}, 2.0)])
    if cfg.engine.name == "ddp":
        groups.append(
            [
                ({}, 0.0),
                ({"engine.name": "offload", "engine.params": "none", "engine.optimizer": "disk"}, 3.0),
                ({"engine.name": "offload", "engine.params": "disk", "engine.optimizer": "disk"}, 5.0),
            ]
        )
    if world > 1 and cfg.engine.name == "ddp":
        groups.append(
            [({}, 0.0), ({"engine.name": "fsdp2"}, 1.5), ({"engine.name": "deepspeed", "deepspeed.zero_stage": 3}, 2.0)]
        )
    return groups


def _candidate(cfg, overrides: dict):
    """cfg with overrides, validated as a run would be; None when the combination is refused."""
    if not overrides:
        return cfg
    try:
        new = C.replace(cfg, **overrides)
        C.validate(new)
    except (ConfigError, SlimtuneError):
        return None
    return new


def fit(cfg, budget: int, world: int = 1, device: str | None = None, disk: int | None = None) -> tuple[dict, Plan]:
    """(overrides, plan) of the cheapest candidate predicted under FIT_MARGIN x budget (and writing at most
    `disk` bytes: --disk); SlimtuneError naming the smallest predicted peak when none is."""
    options = []
    for combo in itertools.product(*_choices(cfg, world)):
        overrides, cost = {}, 0.0
        for o, c in combo:
            overrides.update(o)
            cost += c
        options.append((cost, len(overrides), overrides))
    options.sort(key=lambda x: (x[0], x[1]))
    smallest, cache = None, {}  # one model: its weight and optimizer counts shared by the candidates
    skipped_for_disk = None
    for cost, _, overrides in options:
        cand = _candidate(cfg, overrides)
        if cand is None:
            continue
        plan = plan_memory(cand, world, device, cache)
        if disk is not None and check_disk(plan.disk, disk) is not None:
            if skipped_for_disk is None or plan.disk["total"] < skipped_for_disk[1].disk["total"]:
                skipped_for_disk = (overrides, plan)  # the least disk among them, for the refusal
            continue
        if plan.peak_memory_bytes <= FIT_MARGIN * budget:
            return overrides, plan
        if smallest is None or plan.peak_memory_bytes < smallest[1].peak_memory_bytes:
            smallest = (overrides, plan)
    if smallest is None and skipped_for_disk is not None:
        over, plan = skipped_for_disk
        shown = " ".join(f"{k}={_text(v)}" for k, v in over.items()) or "the current settings"
        raise SlimtuneError(f"--disk: with {shown} {check_disk(plan.disk, disk)}; free disk or lower checkpoint.keep")
    if smallest is None:
        raise SlimtuneError("--fit: no configuration of the knobs is valid for this recipe")
    over, plan = smallest
    shown = " ".join(f"{k}={_text(v)}" for k, v in over.items()) or "the current settings"
    raise SlimtuneError(
        f"nothing fits in {_gib(budget)}: the smallest predicted peak is "
        f"{_gib(plan.peak_memory_bytes)} ({plan.peak_memory_bytes} bytes, with {shown}), above the "
        f"{FIT_MARGIN:.0%} of the budget --fit allows (a safety margin for the prediction); raise "
        "the budget or use a smaller model / train.seq_len"
    )


def fit_tokens(cfg, overrides: dict) -> str:
    """The last line of --fit: the overrides, or the knobs' current values when nothing needs to change."""
    if not overrides:
        overrides = {k: _get(cfg, k) for k in knob_keys(cfg)}
    return " ".join(f"{k}={_text(v)}" for k, v in overrides.items())


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
