"""Peak memory and time of the LM loss: slimtune's chunked cross-entropy vs naive full logits.

    python benchmarks/chunked_loss.py                 # SmolLM2 shape: 4 x 256 tokens, hidden 576, vocab 49152
    python benchmarks/chunked_loss.py --tokens 4096
    python benchmarks/chunked_loss.py --tokens 1024 4096

Each variant runs forward + backward of the loss alone (hidden states -> lm_head -> CE) in its own
process, so peak RSS (CPU) or max_memory_allocated (GPU) belongs to that variant only. The naive path
is HF's: (N, V) logits upcast to fp32, log-softmax and its gradient.

Results: a table on stdout and JSON in --out (default benchmarks/results/chunked_loss.json): one entry
per shape under "runs", with the machine it ran on. A run replaces the entry of its own shape and keeps
the others, so the 1024- and 4096-token figures that README.md quotes live side by side in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "chunked_loss.json"
MiB = 2**20


def worker(variant: str, tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    import torch

    from slimtune.lm_loss import lm_loss_sum

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    head.weight.requires_grad_(False)  # frozen lm_head, as in LoRA/QLoRA
    h = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    y = torch.randint(0, vocab, (1, tokens), device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = lm_loss_sum(h, head, y, chunk if variant == "chunked" else 0)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "variant": variant,
        "device": device,
        "seconds": time.perf_counter() - t0,
        "peak_extra_bytes": peak,
        "loss": float(loss),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": _processor(device),
    }


def _processor(device: str) -> str:
    import torch

    from qlora_vs_peft import cpu_name  # benchmarks/ is on sys.path when a script here runs

    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def measure(tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    """Both variants at one shape, each in a fresh process."""
    res = {"shape": {"tokens": tokens, "hidden": hidden, "vocab": vocab, "chunk": chunk}}
    for v in ("naive", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            v,
            "--tokens",
            str(tokens),
            "--hidden",
            str(hidden),
            "--vocab",
            str(vocab),
            "--chunk",
            str(chunk),
        ]
        res[v] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    n, c = res["naive"], res["chunked"]
    res["ratios"] = {"peak_memory": c["peak_extra_bytes"] / n["peak_extra_bytes"], "time": c["seconds"] / n["seconds"]}
    res["machine"] = {
        "device": n["device"],
        "processor": n["processor"],
        "threads": n["threads"],
        "torch": n["torch"],
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "date": time.strftime("%Y-%m-%d"),
    }
    return res


def print_run(res: dict) -> None:
    n, c, shape = res["naive"], res["chunked"], res["shape"]
    print(
        f"loss fwd+bwd, {shape['tokens']} tokens x vocab {shape['vocab']} (hidden {shape['hidden']}, chunk "
        f"{shape['chunk']}), device {n['device']} ({n['processor']}, {n['threads']} threads)"
    )
    print(f"{'':22s}{'naive':>12s}{'chunked':>12s}{'chunked/naive':>15s}")
    print(
        f"{'peak extra (MiB)':22s}{n['peak_extra_bytes'] / MiB:12.1f}{c['peak_extra_bytes'] / MiB:12.1f}"
        f"{res['ratios']['peak_memory']:14.2f}x"
    )
    print(f"{'seconds':22s}{n['seconds']:12.3f}{c['seconds']:12.3f}{res['ratios']['time']:14.2f}x")
    print(f"{'loss (sum)':22s}{n['loss']:12.2f}{c['loss']:12.2f}")


def merge(out: Path, new_runs: list[dict]) -> dict:
    """The results file with `new_runs` replacing the runs of the same shape (a file in the old one-run
    layout counts as one run)."""
    old = json.loads(out.read_text()) if out.is_file() else {}
    runs = old.get("runs", [old] if "shape" in old else [])
    shapes = [r["shape"] for r in new_runs]
    runs = [r for r in runs if r["shape"] not in shapes] + new_runs
    return {"runs": sorted(runs, key=lambda r: tuple(r["shape"][k] for k in ("tokens", "hidden", "vocab", "chunk")))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024], help="one run per value")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (runs of other shapes are kept)")
    ap.add_argument("--worker", choices=["naive", "chunked"])
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.tokens[0], a.hidden, a.vocab, a.chunk)))
        return
    runs = []
    for tokens in a.tokens:
        runs.append(measure(tokens, a.hidden, a.vocab, a.chunk))
        print_run(runs[-1])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(merge(a.out, runs), indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
