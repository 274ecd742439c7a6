"""7B-class full fine-tuning on a 24 GiB, 2-core machine: a random Llama-shaped 6.9B model (32 layers, hidden
4096, intermediate 11008, 32 heads, vocab 49152, untied; bf16 safetensors, 13.8 GB) fully fine-tuned for 2
steps (seq 256, batch 1, train.max_grad_norm=0) with the offload engine: weights and optimizer state on disk,
bf16 master weights with stochastic rounding (optim.master_dtype=bfloat16, optim.compensation=stochastic) and
8-bit AdamW moments (optim.state_bits=8). Reports s/step, peak RSS (ru_maxrss of the child), the disk used (the
source model plus the most the run added at once: store and final/) and `slimtune plan`'s figures for the same
run.

`--reference` also checks the options against in-memory training on a model that fits (the 1.0B model of
offload_vs_deepspeed.py, 2 steps): the offloaded run's losses must equal the in-memory run's bit for bit.

    python benchmarks/offload_7b.py [--reference] [--work /tmp/slimtune-7b]

Written to benchmarks/results/offload_7b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_vs_deepspeed import _du, make_model, run_child, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "offload_7b.json"
SHAPE = dict(layers=32, hidden=4096, intermediate=11008)
OPTIONS = [
    "train.seq_len=256",
    "train.batch_size=1",
    "train.max_steps=2",
    "train.max_grad_norm=0",
    "train.warmup_steps=1",
    "train.lr=1e-5",
    "optim.master_dtype=bfloat16",
    "optim.compensation=stochastic",
    "optim.state_bits=8",
    "eval.max_batches=1",
    "data.eval_fraction=0.005",
    "logging.progress=false",
]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_7b(work: Path) -> dict:
    model = work / "llama-6.9b"
    make_model(model, **SHAPE, dtype="bfloat16")
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = run_args(model, out)
    plan = planned(args)
    peak, io, wall = run_child([sys.executable, "-m", "slimtune", "run", "full", *args], disk=work)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + rows, rows)]
    report = json.loads((out / "report.json").read_text())
    source = _du(model)
    result = {
        "params": plan["details"]["params"],
        "source_bytes": source,
        "seconds_per_step": secs,
        "losses": [r["loss"] for r in rows],
        "peak_rss_bytes": peak,
        "report_peak_bytes": report.get("peak_memory_bytes"),
        "planned_peak_bytes": plan["peak_memory_bytes"],
        "planned_disk_bytes": plan["disk_bytes"],
        "disk_bytes": source + io["disk_peak_bytes"],
        "final_bytes": _du(out / "final"),
        "wall_seconds": wall,
        "eval_perplexity": [report["eval_perplexity_before"], report["eval_perplexity"]],
        "offload": {
            k: report["offload"].get(k) for k in ("bytes_read_per_step", "bytes_written_per_step", "activations")
        },
        "options": OPTIONS,
    }
    shutil.rmtree(out / "final", ignore_errors=True)
    return result


def run_args(model: Path, out: Path) -> list[str]:
    return [f"model.name={model}", *OPTIONS, "engine.name=offload", "offload.prefetch=1", f"output_dir={out}"]


def planned(args: list[str]) -> dict:
    """`slimtune plan --json` for the run."""
    cmd = [sys.executable, "-m", "slimtune", "plan", "full", *args, "--json"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout)


def reference(work: Path) -> dict:
    """The same options on the 1.0B model, offloaded and in memory: the losses bit for bit."""
    model = Path("/tmp/slimtune-offload-bench/llama-1b")
    if not (model / "config.json").is_file():
        make_model(model, layers=16, hidden=2048, intermediate=5440)
    out = {}
    for side, extra in (("in_memory", []), ("offload", ["engine.name=offload", "offload.prefetch=1"])):
        d = work / f"ref_{side}"
        shutil.rmtree(d, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "slimtune",
            "run",
            "full",
            f"model.name={model}",
            *OPTIONS,
            *extra,
            f"output_dir={d}",
        ]
        peak, _, wall = run_child(cmd)
        out[side] = {"losses": losses(d), "peak_rss_bytes": peak, "wall_seconds": wall}
        shutil.rmtree(d, ignore_errors=True)
    out["bitwise_equal"] = out["in_memory"]["losses"] == out["offload"]["losses"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/slimtune-7b")
    ap.add_argument("--reference", action="store_true", help="also the in-memory equality check on 1.0B")
    ap.add_argument("--skip-7b", action="store_true", help="only the reference check")
    ap.add_argument("--plan-only", action="store_true", help="refresh only the planner's figures of the 7B run")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    res["machine"] = {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    if a.plan_only:
        plan = planned(run_args(work / "llama-6.9b", work / "run"))
        res["run_7b"].update(planned_peak_bytes=plan["peak_memory_bytes"], planned_disk_bytes=plan["disk_bytes"])
        save(res, RESULTS)
        print(json.dumps({k: res["run_7b"][k] for k in ("planned_peak_bytes", "planned_disk_bytes")}))
        return
    if not a.skip_7b:
        res["run_7b"] = run_7b(work)
        print(json.dumps(res["run_7b"], indent=1), flush=True)
        save(res, RESULTS)
    if a.reference:
        res["reference_1b"] = reference(work)
        print(json.dumps(res["reference_1b"], indent=1), flush=True)
    save(res, RESULTS)


if __name__ == "__main__":
    main()
