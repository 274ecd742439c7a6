"""`slimtune plan RECIPE [key=value ...] [--json] [--fit BUDGET] [--nproc N]`: the predicted peak memory of the
run `slimtune run` would start with the same arguments, from config.json alone (no weights loaded).

stdout carries only the result (the table, one JSON object, or --fit's lines ending in the overrides);
whatever libraries print while the architecture is built goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.plan.disk import disk_line

MiB = 2**20


def world_size(nproc: int | None) -> int:
    """--nproc, else WORLD_SIZE (torchrun's), else 1."""
    if nproc is not None:
        if nproc < 1:
            raise ConfigError(f"--nproc {nproc}: give a number of processes >= 1")
        return nproc
    env = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(env)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={env!r} is not an integer; unset it or pass --nproc N") from None
    if value < 1:
        raise ConfigError(f"WORLD_SIZE={value}: must be >= 1")
    return value


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout (Python or C level) to stderr while the body runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def table(plan, cfg) -> str:
    """The breakdown as `component  bytes  MiB` lines, then the predicted peak and the disk the run writes."""
    width = max(len(k) for k in plan.breakdown) + 2
    lines = [f"{'component':<{width}}{'bytes':>16}{'MiB':>11}"]
    for key, value in plan.breakdown.items():
        lines.append(f"{key:<{width}}{value:>16,}{value / MiB:>11.1f}")
    lines.append(
        f"{'peak (' + plan.phase + ')':<{width}}{plan.peak_memory_bytes:>16,}{plan.peak_memory_bytes / MiB:>11.1f}"
    )
    others = ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in plan.phases.items() if k != plan.phase)
    d = plan.details
    head = (
        f"{d['model']}: {d['params']:,} params, weights {d['weights_format']}, {d['trainable_params']:,} "
        f"trainable, optim {d['optimizer']}, engine {d['engine']} x {plan.world_size} rank(s), "
        f"{d['tokens_per_micro_batch']} tokens per micro-batch, device {plan.device}"
    )
    kind = "peak RSS" if plan.device == "cpu" else "GPU memory (nvidia-smi)"
    return "\n".join(
        [
            head,
            *lines,
            f"other phases: {others}",
            f"predicted peak ({kind}, per rank): {plan.peak_memory_bytes / 2**30:.2f} GiB",
            disk_line(plan.disk, cfg),
        ]
    )


def plan_command(
    recipe: str,
    overrides: list[str],
    as_json: bool = False,
    budget_text: str | None = None,
    nproc: int | None = None,
    disk_text: str | None = None,
) -> int:
    from slimtune import config as C

    cfg = C.load_config(recipe, overrides)  # validated as `slimtune run` does
    world = world_size(nproc)
    with stdout_to_stderr():  # (a built-in model is materialised on first use, which prints)
        from slimtune.formats.hf import context_length

        context = context_length(cfg.model.name)
    if cfg.train.seq_len > context:  # the run's own check (trainer/loop.py)
        raise SlimtuneError(f"train.seq_len={cfg.train.seq_len} exceeds the model's context of {context} tokens")
    from slimtune.plan.fit import parse_budget

    budget = None if budget_text is None else parse_budget(budget_text)
    disk = None if disk_text is None else parse_budget(disk_text, "--disk")
    with stdout_to_stderr():
        from slimtune.plan.estimate import plan_memory

        plan = plan_memory(cfg, world)
        if budget is not None:
            from slimtune.plan.fit import fit, fit_tokens

            changes, fitted = fit(cfg, budget, world, plan.device, disk)
    if budget is None:
        print(json.dumps(plan.to_dict()) if as_json else table(plan, cfg))
        if disk is not None and not as_json:
            from slimtune.plan.disk import check_disk, size

            print(check_disk(plan.disk, disk) or f"fits the disk budget of {size(disk)}")
        return 0
    tokens = fit_tokens(cfg, changes)
    if as_json:
        print(json.dumps({**fitted.to_dict(), "budget_bytes": budget, "fits_as_is": not changes, "overrides": tokens}))
        return 0
    from slimtune.plan.fit import FIT_MARGIN

    gib, margin = 2**30, f"{(1 - FIT_MARGIN) * 100:.0f}% margin for the prediction's error"
    if changes:
        print(
            f"predicted peak {plan.peak_memory_bytes / gib:.2f} GiB does not fit {budget / gib:.2f} GiB (with a "
            f"{margin}); with the overrides below: {fitted.peak_memory_bytes / gib:.2f} GiB"
        )
    else:
        print(
            f"fits as is: predicted peak {plan.peak_memory_bytes / gib:.2f} GiB within {budget / gib:.2f} GiB "
            f"(with a {margin}); the knobs' current values:"
        )
    print(tokens)
    return 0
