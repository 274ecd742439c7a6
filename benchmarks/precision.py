"""Low-precision training linears side by side: train.precision = default | fp8 | halo (levels 0-2) | mxfp4.

    python benchmarks/precision.py                        # SmolLM2-135M, LoRA, 20 steps each (CPU: ~10 minutes)
    python benchmarks/precision.py --recipe full --model tiny-llama --steps 30 --seq-len 64   # a minute

Each setting runs `slimtune run RECIPE` in its own process on the same batches and reports the loss
(mean of the last 5 steps), eval perplexity after training, tokens/s, and ratios to the baseline run:
model.dtype=bfloat16 on CUDA, float32 on CPU (bf16 matmuls are ~25x slower than fp32 on CPUs without
AVX512-BF16/AMX, so the CPU baseline is fp32). On CPU the low-precision GEMMs run their torch references
(quantize, dequantize, fp32 matmul): the figures show accuracy, not speed, which needs a GPU.
Results: a table on stdout and JSON in --out (default benchmarks/results/precision.json).
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

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "baseline": [],
    "fp8": ["train.precision=fp8"],
    "halo0": ["train.precision=halo", "halo.level=0"],
    "halo1": ["train.precision=halo", "halo.level=1"],
    "halo2": ["train.precision=halo", "halo.level=2"],
    "mxfp4": ["train.precision=mxfp4"],
}


def run_one(name: str, a, out_dir: Path) -> dict:
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    args = [
        sys.executable,
        "-m",
        "slimtune",
        "run",
        a.recipe,
        f"model.name={a.model}",
        f"model.dtype={dtype}",
        f"train.max_steps={a.steps}",
        f"train.seq_len={a.seq_len}",
        f"train.batch_size={a.batch_size}",
        f"train.lr={a.lr}",
        "checkpoint.every=0",
        "eval.max_batches=4",
        "logging.progress=false",
        f"output_dir={out_dir}",
        "overwrite=true",
        *RUNS[name],
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out_dir / "report.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "setting": name,
        "compute_dtype": dtype,
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "initial_loss": losses[0],
        "eval_perplexity_before": report["eval_perplexity_before"],
        "eval_perplexity": report["eval_perplexity"],
        "tokens_per_second": report["tokens_per_second"],
        "low_precision_linears": report["low_precision_linears"],
        "peak_memory_bytes": report["peak_memory_bytes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="lora", choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", default="2e-4")
    p.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision.json")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only.split(","):
            rows.append(run_one(name, a, Path(tmp) / name))
            r = rows[-1]
            print(
                f"{name:9s} loss {r['loss_last5']:.4f}  ppl {r['eval_perplexity_before']:.2f} -> "
                f"{r['eval_perplexity']:.2f}  {r['tokens_per_second']:.1f} tok/s",
                flush=True,
            )
    base = next((r for r in rows if r["setting"] == "baseline"), None)
    print(
        f"\n| {a.recipe}, {a.model}, {a.steps} steps | linears swapped | loss (last 5) | x baseline | eval ppl "
        "| x baseline | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["loss_ratio"] = r["loss_last5"] / base["loss_last5"] if base else None
        r["ppl_ratio"] = r["eval_perplexity"] / base["eval_perplexity"] if base else None
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"
        print(
            f"| {r['setting']} | {r['low_precision_linears']} | {r['loss_last5']:.4f} | {fmt(r['loss_ratio'])} "
            f"| {r['eval_perplexity']:.2f} | {fmt(r['ppl_ratio'])} | {r['tokens_per_second']:.1f} |"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": a.model,
                "recipe": a.recipe,
                "steps": a.steps,
                "seq_len": a.seq_len,
                "batch_size": a.batch_size,
                "lr": a.lr,
                "rows": rows,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "cpu": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
