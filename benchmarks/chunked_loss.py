"""Peak memory and time of the LM loss: slimtune's chunked cross-entropy vs naive full logits.

    python benchmarks/chunked_loss.py                 # SmolLM2 shape: 4 x 256 tokens, hidden 576, vocab 49152
    python benchmarks/chunked_loss.py --tokens 4096

Each variant runs forward + backward of the loss alone (hidden states -> lm_head -> CE) in its own
process, so peak RSS (CPU) or max_memory_allocated (GPU) belongs to that variant only. The naive path
is HF's: (N, V) logits upcast to fp32, log-softmax and its gradient. Writes JSON beside the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def worker(variant: str, tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    import torch

    from slimtune.loss import lm_loss_sum

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
    return {"variant": variant, "device": device, "seconds": time.perf_counter() - t0,
            "peak_extra_bytes": peak, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chunked_loss.json"))
    ap.add_argument("--worker", choices=["naive", "chunked"])
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.tokens, a.hidden, a.vocab, a.chunk)))
        return
    res = {}
    for v in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--worker", v, "--tokens", str(a.tokens), "--hidden", str(a.hidden),
               "--vocab", str(a.vocab), "--chunk", str(a.chunk)]
        res[v] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    n, c = res["naive"], res["chunked"]
    res["ratios"] = {"peak_memory": c["peak_extra_bytes"] / n["peak_extra_bytes"], "time": c["seconds"] / n["seconds"]}
    res["shape"] = {"tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "chunk": a.chunk}
    print(f"loss fwd+bwd, {a.tokens} tokens x vocab {a.vocab} (hidden {a.hidden}), device {n['device']}")
    print(f"{'':22s}{'naive':>12s}{'chunked':>12s}{'chunked/naive':>15s}")
    print(f"{'peak extra (MiB)':22s}{n['peak_extra_bytes'] / MiB:12.1f}{c['peak_extra_bytes'] / MiB:12.1f}"
          f"{res['ratios']['peak_memory']:14.2f}x")
    print(f"{'seconds':22s}{n['seconds']:12.3f}{c['seconds']:12.3f}{res['ratios']['time']:14.2f}x")
    print(f"{'loss (sum)':22s}{n['loss']:12.2f}{c['loss']:12.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
