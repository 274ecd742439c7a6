"""Memory-efficient optimizers side by side: full fine-tuning with AdamW, 8-bit AdamW, GaLore, FRUGAL, DCT.

    python benchmarks/optimizers.py   # SmolLM2-135M, 100 steps each (about an hour on 2 CPU cores)
    python benchmarks/optimizers.py --model tiny-llama --steps 20 --seq-len 64   # smoke test (a minute)

Each optimizer runs `slimtune run full` in its own fresh process on the same batches (pydoc text,
seq --seq-len x batch --batch-size, lr warmup + cosine, clip 1.0, activation checkpointing) and reports:
  optimizer-state bytes (every tensor in optimizer.state: moments, projections, 8-bit scales),
  peak RSS of that process (report.json), training tokens/s, the loss after N steps (mean of the last 5 steps),
  projection seconds (time in SVD / DCT selection / subspace selection).
Low-rank settings: rank = hidden/4 (GaLore, DCT), density 0.25 (FRUGAL), update_gap --update-gap, and
every 2-D weight is projected (`optim.full_rank_modules=[]`, embeddings included) so that the state
ratio measures the optimizers; with the recipes' default (embeddings and lm_head on plain AdamW) the
embedding's full AdamW state is added on top. Every optimizer runs at lr 1e-4 (--lr to change).
Targets: state <= 0.3x AdamW for galore/frugal/dct (<= 0.1x with 8-bit states); FRUGAL's loss after
100 steps within 5% of AdamW's; DCT's projection time <= 0.3x GaLore's SVD time.
Results: a table on stdout and JSON in --out (default benchmarks/results/optimizers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "optimizers.json"
# name -> (recipe, extra overrides, lr)
RUNS = {
    "adamw": ("full", ["optim.name=adamw"], "1e-4"),
    "adamw-8bit": ("full", ["optim.name=adamw", "optim.state_bits=8"], "1e-4"),
    "galore": ("galore", [], "1e-4"),
    "galore-8bit": ("galore", ["optim.state_bits=8"], "1e-4"),
    "frugal": ("frugal", [], "1e-4"),
    "frugal-8bit": ("frugal", ["optim.state_bits=8"], "1e-4"),
    "dct": ("dct", [], "1e-4"),
    "dct-8bit": ("dct", ["optim.state_bits=8"], "1e-4"),
}


def hidden_size(model: str) -> int:
    from slimtune.formats.hf import resolve_model_dir

    return json.loads((resolve_model_dir(model) / "config.json").read_text())["hidden_size"]


def run_one(name: str, a, out_dir: Path) -> dict:
    recipe, extra, lr = RUNS[name]
    own = {  # each optimizer's own section (the recipe's optimizer: galore / frugal / dct, or none for adamw)
        "galore": [
            f"galore.rank={max(1, hidden_size(a.model) // 4)}",
            f"galore.update_gap={a.update_gap}",
            f"galore.proj_dtype={a.proj_dtype}",
        ],
        "dct": [f"dct.rank={max(1, hidden_size(a.model) // 4)}", f"dct.update_gap={a.update_gap}"],
        "frugal": ["frugal.density=0.25", f"frugal.update_gap={a.update_gap}", f"frugal.proj_dtype={a.proj_dtype}"],
    }.get(recipe, [])
    args = [
        sys.executable,
        "-m",
        "slimtune",
        "run",
        recipe,
        f"model.name={a.model}",
        f"train.max_steps={a.steps}",
        f"train.seq_len={a.seq_len}",
        f"train.batch_size={a.batch_size}",
        f"train.lr={a.lr or lr}",
        *own,
        "optim.full_rank_modules=[]",
        "checkpoint.every=0",
        "eval.max_batches=1",
        "logging.progress=false",
        f"output_dir={out_dir}",
        "overwrite=true",
        *extra,
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
    report = json.loads((out_dir / "report.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "optimizer": name,
        "state_bytes": report["optimizer_state_bytes"],
        "peak_rss_bytes": report["peak_memory_bytes"],
        "tokens_per_second": report["tokens_per_second"],
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "initial_loss": losses[0],
        "projection_seconds": report.get("projection_seconds"),
        "wall_seconds": report["wall_seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--update-gap", type=int, default=50)
    p.add_argument(
        "--proj-dtype",
        default="float32",
        choices=["float32", "bfloat16", "int8"],
        help="storage of GaLore's / FRUGAL's projection P (galore.proj_dtype / frugal.proj_dtype)",
    )
    p.add_argument("--lr", default=None, help="one lr for every optimizer (default: per optimizer)")
    p.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only.split(","):
            row = run_one(name, a, Path(tmp) / name)
            rows.append(row)
            print(
                f"{name:12s} state {row['state_bytes'] / 2**20:9.1f} MiB"
                f"  peak {row['peak_rss_bytes'] / 2**20:7.0f} MiB"
                f"  {row['tokens_per_second']:7.1f} tok/s  loss {row['loss_last5']:.4f}"
                f"  proj {row['projection_seconds'] or 0:.2f}s",
                flush=True,
            )
    base = next((r for r in rows if r["optimizer"] == "adamw"), None)
    checks = {}
    print(
        "\n| optimizer | state MiB | x AdamW | peak RSS MiB | tokens/s | x AdamW | loss (last 5) | x AdamW "
        "| projection s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (lambda k: r[k] / base[k]) if base else (lambda k: float("nan"))
        r["state_ratio"], r["speed_ratio"], r["loss_ratio"] = (
            ratio("state_bytes"),
            ratio("tokens_per_second"),
            ratio("loss_last5"),
        )
        print(
            f"| {r['optimizer']} | {r['state_bytes'] / 2**20:.1f} | {r['state_ratio']:.3f} "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} "
            f"| {r['tokens_per_second']:.1f} | {r['speed_ratio']:.2f} | {r['loss_last5']:.4f} "
            f"| {r['loss_ratio']:.3f} "
            f"| {r['projection_seconds'] if r['projection_seconds'] is not None else '-'} |"
        )
        if base and r["optimizer"] in ("galore", "frugal", "dct"):
            checks[f"{r['optimizer']} state <= 0.3x AdamW ({r['state_ratio']:.3f})"] = r["state_ratio"] <= 0.3
        if base and r["optimizer"].endswith("-8bit") and r["optimizer"] != "adamw-8bit":
            checks[f"{r['optimizer']} state <= 0.1x AdamW ({r['state_ratio']:.3f})"] = r["state_ratio"] <= 0.1
        if base and r["optimizer"] == "frugal":
            checks[f"frugal loss within 5% of AdamW after {a.steps} steps ({r['loss_ratio']:.3f})"] = (
                abs(r["loss_ratio"] - 1) <= 0.05
            )
    by = {r["optimizer"]: r for r in rows}
    if {"galore", "dct"} <= by.keys() and by["galore"]["projection_seconds"]:
        ratio = by["dct"]["projection_seconds"] / by["galore"]["projection_seconds"]
        checks[f"dct projection time <= 0.3x galore's SVD ({ratio:.3f})"] = ratio <= 0.3
    for name, ok in checks.items():
        print(f"target: {name}: {'MET' if ok else 'NOT MET'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": a.model,
                "steps": a.steps,
                "proj_dtype": a.proj_dtype,
                "seq_len": a.seq_len,
                "batch_size": a.batch_size,
                "update_gap": a.update_gap,
                "rows": rows,
                "targets": checks,
                "cpu": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
