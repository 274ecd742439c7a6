"""LQ-LoRA vs plain NormalFloat quantization (QLoRA's base) and the LoftQ / EoRA inits, before training.

    python benchmarks/lq_lora_vs_qlora.py                       # SmolLM2-135M (tens of minutes on a CPU)
    python benchmarks/lq_lora_vs_qlora.py --model tiny-llama --seq-len 64 --eval-batches 4   # smoke test

Every method starts from the same full-precision model and quantizes every linear but lm_head:
  bf16        weights rounded to bf16 (computed in fp32 here): the unquantized reference
  nf4 / nf3   NormalFloat, blocks of 64, double-quantized scales (QLoRA's base at 4 and 3 bits)
  lq_lora@B   LQ-LoRA, rank 16, Fisher-weighted, formats NF{2,3,4} x blocks {64,128,256} (dq) chosen by
              the ILP under an average budget of B bits/param
  loftq/eora  rank-16 LoRA initialised by LoftQ / EoRA on the nf4 or nf3 base
Reported per method: bits/param of the quantized linears (codes + scales), the LoRA factors' extra
bits/param counted at 16 bits each (separately), eval perplexity on the held-out split of pydoc text
(slimtune.data, never seen by calibration), and the seconds to build the quantized model.
Targets: lq_lora@3.0 has a lower perplexity than nf3; lq_lora@3.5 is within 2% of nf4.
Results: a table on stdout and JSON in --out (default benchmarks/results/lq_lora_vs_qlora.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from slimtune import config as C
from slimtune.model.quantize import decomposition_of, quantize_lowrank
from slimtune.data import build_splits
from slimtune.formats.hf import load_model, load_tokenizer
from slimtune.quant import bits_per_param, is_quantized_linear, quantize_model
from slimtune.trainer.evaluate import perplexity
from slimtune.lm_loss import CausalLMLoss

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lq_lora_vs_qlora.json"
METHODS = ["bf16", "nf4", "nf3", "lq_lora@3.0", "lq_lora@3.5", "loftq@nf4", "loftq@nf3", "eora@nf4", "eora@nf3"]


def method_overrides(method: str, a) -> list[str]:
    base = [
        f"model.name={a.model}",
        f"train.seq_len={a.seq_len}",
        f"lora.rank={a.rank}",
        f"lora.alpha={2 * a.rank}",
        "quant.block_size=64",
        "quant.double_quant=true",
        f"lq_lora.calibration_samples={a.calibration}",
        "logging.progress=false",
    ]
    if method.startswith("lq_lora@"):
        return [*base, "adapter.type=lq_lora", "quant.method=lq_lora", f"lq_lora.budget_bits={method[8:]}"]
    if "@" in method:  # loftq@nf4, eora@nf3
        init, fmt = method.split("@")
        return [*base, f"quant.method={fmt}", f"adapter.init={init}"]
    return [*base, f"quant.method={method if method in ('nf4', 'nf3') else 'none'}"]


def build(method: str, cfg, blocks) -> torch.nn.Module:
    model = load_model(cfg.model.name, "float32")
    if method == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).float()
    elif method in ("nf4", "nf3"):
        quantize_model(model, method, block_size=64, double_quant=True, compute_dtype=torch.float32)
    else:
        quantize_lowrank(model, decomposition_of(cfg, blocks), torch.float32, log=lambda s: None)
    return model.eval()


def storage(model: torch.nn.Module) -> tuple[float | None, float | None]:
    """(bits/param of the quantized linears, LoRA factor bits/param at 16 bits each) over those linears."""
    from slimtune.adapters import adapter_modules

    q = [m for m in model.modules() if is_quantized_linear(m)]
    if not q:
        return None, None
    numel = sum(m.in_features * m.out_features for m in q)
    bits = sum(bits_per_param(m) * m.in_features * m.out_features for m in q) / numel
    lora = sum(m.rank * (m.in_features + m.out_features) for m in adapter_modules(model).values())
    return bits, 16 * lora / numel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=16, help="eval batches of 4 blocks (0 = whole split)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--calibration", type=int, default=16, help="calibration blocks (Fisher, EoRA)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    from slimtune.cli import _quiet_libraries

    _quiet_libraries()  # no transformers progress bars in the table
    torch.manual_seed(0)
    tokenizer = load_tokenizer(a.model)
    data = build_splits("pydoc", tokenizer, a.seq_len, 0.05)
    rows = []
    for method in a.methods.split(","):
        cfg = C.load_config(None, method_overrides(method, a))
        t0 = time.perf_counter()
        model = build(method, cfg, data.train)
        seconds = time.perf_counter() - t0
        ppl = perplexity(CausalLMLoss(model, 256), data.eval, 4, a.eval_batches, torch.device("cpu"))
        bits, lora_bits = storage(model)
        rows.append(
            {
                "method": method,
                "bits_per_param": bits,
                "lora_bits_per_param": lora_bits,
                "perplexity": ppl,
                "seconds": seconds,
            }
        )
        print(
            f"{method:12s} bits {bits or 16:7.3f}  lora +{lora_bits or 0:5.3f}  ppl {ppl:9.3f}  {seconds:7.1f}s",
            flush=True,
        )
        del model
    by = {r["method"]: r for r in rows}
    checks = {}
    if {"lq_lora@3.0", "nf3"} <= by.keys():
        checks["lq_lora@3.0 ppl < nf3 ppl"] = by["lq_lora@3.0"]["perplexity"] < by["nf3"]["perplexity"]
    if {"lq_lora@3.5", "nf4"} <= by.keys():
        ratio = by["lq_lora@3.5"]["perplexity"] / by["nf4"]["perplexity"]
        checks[f"lq_lora@3.5 ppl within 2% of nf4 (ratio {ratio:.4f})"] = ratio <= 1.02
    print("\n| method | bits/param (codes+scales) | LoRA +bits/param (16-bit) | eval perplexity | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        bits = f"{r['bits_per_param']:.3f}" if r["bits_per_param"] else "16 (bf16)"
        lora = f"{r['lora_bits_per_param']:.3f}" if r["lora_bits_per_param"] else "-"
        print(f"| {r['method']} | {bits} | {lora} | {r['perplexity']:.3f} | {r['seconds']:.1f} |")
    for name, ok in checks.items():
        print(f"target: {name}: {'MET' if ok else 'NOT MET'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": a.model,
                "seq_len": a.seq_len,
                "eval_batches": a.eval_batches,
                "eval_blocks_total": len(data.eval),
                "rank": a.rank,
                "calibration": a.calibration,
                "rows": rows,
                "targets": checks,
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
