"""sparse_ft (SpIEL) vs LoRA at the same number of trainable parameters, SmolLM2-135M on pydoc.

Every run is its own `slimtune run` process (peak RSS is the whole process's) with the same data, steps, seq
and batch. LoRA: rank 16 on all-linear (the recipe). sparse_ft: sparse_ft.num_params = LoRA's trainable count,
on the same modules. Each is tried at three learning rates (the recipe's among
them; the same grid for both) at the short budget; the best of each by eval loss (pydoc's eval split) then runs the
longer budget
and on an NF4 base (QLoRA vs qSpIEL). Writes benchmarks/results/sparse_ft_vs_lora.json and prints a table.

    python benchmarks/sparse_ft_vs_lora.py [--steps 30] [--long-steps 120] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sparse_ft_vs_lora.json"
LRS = {"lora": ["1e-3", "3e-3", "1e-2"], "sparse_ft": ["1e-3", "3e-3", "1e-2"]}  # the same grid for both


def run(recipe: str, work: Path, tag: str, overrides: list[str]) -> dict:
    out = work / tag
    cmd = [
        sys.executable,
        "-m",
        "slimtune",
        "run",
        recipe,
        *overrides,
        "logging.progress=false",
        "checkpoint.every=0",
        "eval.max_batches=20",
        f"output_dir={out}",
        "overwrite=true",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sparse_ft_vs_lora: {tag} failed:\n{r.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    row = {
        k: rep[k]
        for k in (
            "final_loss",
            "eval_perplexity",
            "eval_perplexity_before",
            "peak_memory_bytes",
            "tokens_per_second",
            "trainable_params",
            "wall_seconds",
        )
    }
    row["eval_loss"] = math.log(rep["eval_perplexity"])
    row["overrides"] = overrides
    print(
        f"{tag:34s} trainable {row['trainable_params']:>9,d}  final loss {row['final_loss']:.4f}  eval loss "
        f"{row['eval_loss']:.4f}  peak {row['peak_memory_bytes'] / 2**20:7.0f} MiB  {row['tokens_per_second']:.0f} "
        "tok/s",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--long-steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--work", default="/tmp/slimtune-sparse-ft-bench")
    a = ap.parse_args()
    work = Path(a.work)
    common = [
        f"model.name={a.model}",
        f"model.dtype={a.dtype}",
        f"train.batch_size={a.batch}",
        "train.seq_len=256",
        "train.warmup_steps=3",
    ]
    res = {
        "config": {
            "model": a.model,
            "dtype": a.dtype,
            "batch": a.batch,
            "seq_len": 256,
            "steps": a.steps,
            "long_steps": a.long_steps,
        },
        "runs": {},
    }
    # LoRA's trainable count fixes sparse_ft's
    lora_lr = {}
    for lr in LRS["lora"]:
        res["runs"][f"lora lr={lr}"] = run(
            "lora", work, f"lora_{lr}", [*common, f"train.max_steps={a.steps}", f"train.lr={lr}"]
        )
        lora_lr[lr] = res["runs"][f"lora lr={lr}"]["eval_loss"]
    n = res["runs"][f"lora lr={LRS['lora'][0]}"]["trainable_params"]
    res["config"]["num_params"] = n
    sft = [*common, f"sparse_ft.num_params={n}"]
    sft_lr = {}
    for lr in LRS["sparse_ft"]:
        res["runs"][f"sparse_ft lr={lr}"] = run(
            "sparse_ft", work, f"sft_{lr}", [*sft, f"train.max_steps={a.steps}", f"train.lr={lr}"]
        )
        sft_lr[lr] = res["runs"][f"sparse_ft lr={lr}"]["eval_loss"]
    best = {"lora": min(lora_lr, key=lora_lr.get), "sparse_ft": min(sft_lr, key=sft_lr.get)}
    res["best_lr"] = best
    short = (res["runs"][f"lora lr={best['lora']}"], res["runs"][f"sparse_ft lr={best['sparse_ft']}"])
    res["short"] = {
        "eval_loss_lora": short[0]["eval_loss"],
        "eval_loss_sparse_ft": short[1]["eval_loss"],
        "peak_memory_ratio": short[1]["peak_memory_bytes"] / short[0]["peak_memory_bytes"],
    }
    if a.long_steps:
        for name, recipe, extra in (("lora", "lora", common), ("sparse_ft", "sparse_ft", sft)):
            res["runs"][f"{name} long"] = run(
                recipe, work, f"{name}_long", [*extra, f"train.max_steps={a.long_steps}", f"train.lr={best[name]}"]
            )
        lo, sp = res["runs"]["lora long"], res["runs"]["sparse_ft long"]
        res["long"] = {
            "eval_loss_lora": lo["eval_loss"],
            "eval_loss_sparse_ft": sp["eval_loss"],
            "peak_memory_ratio": sp["peak_memory_bytes"] / lo["peak_memory_bytes"],
        }
    for name, recipe, extra in (("qlora", "qlora", common), ("qsparse_ft", "sparse_ft", [*sft, "quant.method=nf4"])):
        lr = best["lora" if name == "qlora" else "sparse_ft"]
        res["runs"][f"{name} nf4"] = run(
            recipe, work, f"{name}_nf4", [*extra, f"train.max_steps={a.steps}", f"train.lr={lr}"]
        )
    q, s = res["runs"]["qlora nf4"], res["runs"]["qsparse_ft nf4"]
    res["nf4"] = {
        "eval_loss_qlora": q["eval_loss"],
        "eval_loss_qsparse_ft": s["eval_loss"],
        "peak_memory_ratio": s["peak_memory_bytes"] / q["peak_memory_bytes"],
    }
    from qlora_vs_peft import cpu_name  # benchmarks/ is on sys.path when a script here runs

    res["device"] = {"cpu": cpu_name()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("best_lr", "short", "long", "nf4") if k in res}, indent=1))


if __name__ == "__main__":
    main()
