"""Why the 2.1B offload run's eval perplexity rose (69k -> 64.8M over 2 steps) while its train loss fell: its
settings (fp32 AdamW, lr 1e-4 with a 1-step warmup, no clipping, seq 256, batch 1, eval = 1 block) through the
in-memory engine and the offload engine (params + AdamW state on disk), each side in its own process, on
models that fit in RAM (the 2.1B run's layer width with 4 layers, or its depth at hidden 1024), with layers
kept or recomputed, checkpointing, other learning rates; and on the 2.1B itself (offload only) at lr 1e-5.

    python benchmarks/offload_eval_check.py --shape 4,2560,7040 [--sides in_memory offload ...]

Results per shape and side (merged into what is there): benchmarks/results/offload_eval_check.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_vs_deepspeed import make_model  # noqa: E402  (the benchmark's random Llama writer)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "offload_eval_check.json"
BASE = [
    "train.seq_len=256",
    "train.batch_size=1",
    "train.max_steps=2",
    "train.max_grad_norm=0",
    "train.warmup_steps=1",
    "eval.max_batches=1",
    "data.eval_fraction=0.005",
    "logging.progress=false",
    "model.dtype=float32",
    "train.device=cpu",
]
SIDES = {
    "in_memory": [],
    "offload": ["engine.name=offload", "offload.prefetch=1"],
    "in_memory_lr1e-5": ["train.lr=1e-5"],
    "in_memory_8_eval_blocks": ["eval.max_batches=8"],
    # the 2.1B run's activations did not fit auto's budget (1/16 of RAM): it recomputed each layer in backward
    "offload_recompute": ["engine.name=offload", "offload.prefetch=1", "offload.activations=recompute"],
    "offload_lr1e-5": ["train.lr=1e-5", "engine.name=offload", "offload.prefetch=1"],
    "in_memory_lr3e-4": ["train.lr=3e-4"],
    "in_memory_lr1e-3": ["train.lr=1e-3"],
    "offload_lr1e-3": ["train.lr=1e-3", "engine.name=offload", "offload.prefetch=1"],
    # the 2.1B run also checkpointed every step
    "in_memory_checkpoint_every_step": ["checkpoint.every=1", "checkpoint.keep=1"],
    "offload_checkpoint_every_step": [
        "engine.name=offload",
        "offload.prefetch=1",
        "checkpoint.every=1",
        "checkpoint.keep=1",
    ],
}


def run(model: Path, work: Path, name: str, extra: list[str]) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "slimtune",
        "run",
        "full",
        f"model.name={model}",
        *BASE,
        "train.lr=1e-4",
        *extra,
        f"output_dir={out}",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "losses": [r["loss"] for r in rows],
        "eval_perplexity": [report["eval_perplexity_before"], report["eval_perplexity"]],
        "overrides": extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--shape",
        default="4,2560,7040",
        help="layers,hidden,intermediate (default: the 2.1B run's layer width, 4 layers; 24,1024,2816: its depth)",
    )
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    a = ap.parse_args()
    layers, hidden, intermediate = (int(v) for v in a.shape.split(","))
    work = Path("/tmp/slimtune-offload-eval-check")
    model = work / f"model-{layers}l-h{hidden}"
    make_model(model, layers=layers, hidden=hidden, intermediate=intermediate)
    result = {name: run(model, work, name, SIDES[name]) for name in a.sides}
    everything = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    everything.setdefault(f"{layers} layers, hidden {hidden}, intermediate {intermediate}", {}).update(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(everything, indent=1) + "\n")
    for name, r in result.items():
        if isinstance(r, dict):
            print(
                f"{name:26s} loss {r['losses']}  "
                f"eval ppl {r['eval_perplexity'][0]:.4g} -> {r['eval_perplexity'][1]:.4g}"
            )


if __name__ == "__main__":
    main()
