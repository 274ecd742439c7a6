"""What a run writes besides checkpoints: metrics.jsonl, report.json, loss.png, wandb, the summary line."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

from slimtune.io import write_text


class MetricsLog:
    """metrics.jsonl, one JSON object per optimizer step. On resume, lines after the checkpoint's step
    are dropped (they belong to the run that crashed), so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None, wandb_run=None):
        self.path = Path(path)
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the crash
                    continue
                if row.get("step", math.inf) <= resume_step:
                    self.rows.append(row)
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.wandb = wandb_run

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def reset_peak_memory(device: torch.device) -> None:
    """Start the run's peak here, so a run in a process that already did other work (a notebook, a test
    session, a second run) reports its own peak. On CPU: Linux's clear_refs 5 resets VmHWM to the RSS now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the process's lifetime peak (ru_maxrss) is reported


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated on GPU, else the peak RSS since reset_peak_memory."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024, "cpu_peak_rss"
    except (OSError, StopIteration):
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        return int(rss_kb * 1024), "cpu_peak_rss"


def plot_loss(rows: list[dict], path: Path, evals: list[tuple[int, float]] = ()) -> None:
    """loss.png: the train loss per step, the eval loss (log of the eval perplexity) at each (step, perplexity)
    of `evals` and of the rows, and the learning rate on its own axis. Without matplotlib (a lean install) a note
    instead: the curves are in metrics.jsonl anyway."""
    try:
        import matplotlib
    except ImportError:
        print(f"slimtune: matplotlib is not installed: {path.name} not drawn (metrics.jsonl holds the curve)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="train loss")
    points = sorted([*evals, *((r["step"], r["eval_perplexity"]) for r in rows if "eval_perplexity" in r)])
    points = [(step, math.log(p)) for step, p in points if p is not None and math.isfinite(p) and p > 0]
    if points:
        ax.plot(*zip(*points), "o--", ms=4, lw=1, color="tab:red", label="eval loss (log perplexity)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], lw=1, color="tab:gray", alpha=0.7, label="lr")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(".loss.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def start_wandb(cfg, config_dict: dict, output_dir: Path):
    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError:
        from slimtune.errors import SlimtuneError

        raise SlimtuneError("logging.wandb=true needs wandb: pip install wandb (offline: WANDB_MODE=offline)") from None
    return wandb.init(project=cfg.logging.wandb_project, config=config_dict, dir=str(output_dir))


def summary_line(report: dict) -> str:
    def ppl(x):
        return f"{x:.2f}" if x is not None else "n/a"

    gib = report["peak_memory_bytes"] / 2**30
    return (
        f"loss {report['initial_loss']:.4f} -> {report['final_loss']:.4f} | eval perplexity "
        f"{ppl(report['eval_perplexity_before'])} -> {ppl(report['eval_perplexity'])} | "
        f"{report['tokens_per_second']:.0f} tok/s | peak {gib:.2f} GiB ({report['peak_memory_kind']}) | "
        f"trainable {report['trainable_params']:,} / {report['total_params']:,} params"
    )


def print_main(msg: str, is_main: bool) -> None:
    if is_main:
        print(msg, file=sys.stdout, flush=True)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, projections, quantization scales)."""
    total, seen = 0, set()

    def walk(o):
        nonlocal total
        if isinstance(o, torch.Tensor):
            key = (o.data_ptr(), o.numel(), o.dtype)
            if o.numel() and key not in seen:
                seen.add(key)
                total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    try:
        walk(optimizer.state_dict())  # param_groups hold no tensors
    except KeyError:  # ZeRO keys the client optimizer's state by its own flat partitions
        walk(list(optimizer.state.values()))
    return total
