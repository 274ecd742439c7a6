"""QLoRA: slimtune vs PEFT + bitsandbytes and PEFT LoRA on the unquantized base; peak memory and speed.

    python benchmarks/qlora_vs_peft.py                     # SmolLM2-135M, batch 2 and 4, 3 runs each (~25 min)
    python benchmarks/qlora_vs_peft.py --model tiny-llama --steps 3 --seq-len 64 --batch-sizes 2 --runs 1

The run: SmolLM2-135M, pydoc text, seq 256, LoRA r=16 alpha=32 dropout 0 on every linear but lm_head,
AdamW + warmup/cosine lr + clip 1.0 from the `qlora` recipe, `--steps` steps. Every side sees the very same
batches (slimtune.data, one token stream cut into blocks: no document masks, as PEFT's loop trains).
  slimtune      `python -m slimtune run qlora` with its defaults (NF4 + double quant, model.dtype=auto), once
                with data.packing=stream (the comparison) and once with documents (its default packing)
  peft_bnb      transformers + BitsAndBytesConfig(nf4, double quant, blocks of 64) + get_peft_model, fp32 and
                bf16 compute (bnb_4bit_compute_dtype and the model's dtype)
  peft_lora     PEFT LoRA on the unquantized model, fp32 and bf16
Each run is a fresh process with the default allocator and no environment variables; runs are interleaved
(round robin) so a slow minute of the machine spreads over the sides.
  peak memory = that process's peak RSS (VmHWM; model load and eval included)
  tokens/s    = steps * batch * seq_len / seconds of the training steps only (no load, no eval)
Targets (the issue): slimtune's peak <= 0.6x PEFT + bnb at its best compute dtype (the lower median), and
tokens/s >= 1.0x PEFT LoRA unquantized at its best (the higher median). Table on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
# keep benchmarks/ off the path: a module here could shadow a package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "qlora_vs_peft.json"
LOOP = SimpleNamespace(**runpy.run_path(str(ROOT / "benchmarks" / "_hf_loop.py")))  # peak_rss, train
MiB = 2**20
SIDES = [
    ("slimtune", "stream"),
    ("slimtune", "documents"),
    ("peft_bnb", "float32"),
    ("peft_bnb", "bfloat16"),
    ("peft_lora", "float32"),
    ("peft_lora", "bfloat16"),
]


def overrides(a, batch: int, packing: str, output_dir: str) -> list[str]:
    """The run as overrides of the qlora recipe; the PEFT worker loads the same config (lr, warmup, seed,
    betas, eps, clipping identical by construction). Compute dtype and allocator: slimtune's defaults."""
    return [
        f"model.name={a.model}",
        "data.source=pydoc",
        f"data.packing={packing}",
        f"train.seq_len={a.seq_len}",
        f"train.batch_size={batch}",
        "train.grad_accum=1",
        f"train.max_steps={a.steps}",
        f"lora.rank={a.rank}",
        f"lora.alpha={2 * a.rank}",
        "lora.dropout=0.0",
        "adapter.target_modules=all-linear",
        "eval.max_batches=1",
        "eval.every=0",
        "checkpoint.every=0",
        "logging.progress=false",
        "logging.wandb=false",
        f"output_dir={output_dir}",
        "overwrite=true",
    ]


def peft_worker(a) -> None:
    """One PEFT run in this process (side a.worker, compute dtype a.dtype); writes its result JSON to a.out."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from slimtune import config as C
    from slimtune.data import build_splits
    from slimtune.formats.hf import load_tokenizer, resolve_model_dir

    cfg = C.load_config("qlora", overrides(a, a.batch_size, "stream", "unused"))
    t, dtype = cfg.train, getattr(torch, a.dtype)
    torch.manual_seed(t.seed)
    data = build_splits(cfg.data.source, load_tokenizer(a.model), t.seq_len, cfg.data.eval_fraction)
    kw = {}
    if a.worker == "peft_bnb":  # bnb >= 0.45 quantizes on CPU in from_pretrained: every linear but lm_head
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(a.model), dtype=dtype, **kw)
    model.config.use_cache = False
    # no prepare_model_for_kbit_training: it upcasts weights and turns on checkpointing (slimtune does neither)
    model = get_peft_model(
        model,
        LoraConfig(
            r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    losses, seconds = LOOP.train(model, cfg, data)
    Path(a.out).write_text(
        json.dumps(
            {
                "peak_memory_bytes": LOOP.peak_rss(),
                "tokens_per_second": t.max_steps * t.batch_size * t.seq_len / seconds,
                "initial_loss": losses[0],
                "final_loss": losses[-1],
                "compute_dtype": a.dtype,
                "trainable_params": sum(p.numel() for p in params),
                "threads": torch.get_num_threads(),
            }
        )
    )


def _run(cmd: list[str], env: dict) -> None:
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"qlora_vs_peft: failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")


def one_run(a, side: str, variant: str, batch: int, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if side == "slimtune":
        out = tmp / f"run-{variant}-{batch}"
        cmd = [sys.executable, "-m", "slimtune", "run", "qlora", *overrides(a, batch, variant, str(out))]
        _run(cmd, env)
        r = json.loads((out / "report.json").read_text())
        return {
            k: r[k]
            for k in (
                "peak_memory_bytes",
                "tokens_per_second",
                "initial_loss",
                "final_loss",
                "compute_dtype",
                "trainable_params",
            )
        }
    res = tmp / "peft.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--dtype",
        variant,
        "--model",
        a.model,
        "--steps",
        str(a.steps),
        "--seq-len",
        str(a.seq_len),
        "--batch-size",
        str(batch),
        "--rank",
        str(a.rank),
        "--out",
        str(res),
    ]
    _run(cmd, env)
    return json.loads(res.read_text())


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(rows: list[dict]) -> dict:
    return {
        "peak_memory_bytes": spread([r["peak_memory_bytes"] for r in rows]),
        "tokens_per_second": spread([r["tokens_per_second"] for r in rows]),
        "initial_loss": rows[0]["initial_loss"],
        "final_loss": rows[0]["final_loss"],
        "compute_dtype": rows[0]["compute_dtype"],
        "trainable_params": rows[0]["trainable_params"],
    }


def ratios(by: dict) -> dict:
    bnb = min(by[f"peft_bnb/{d}"]["peak_memory_bytes"]["median"] for d in ("float32", "bfloat16"))
    lora = max(by[f"peft_lora/{d}"]["tokens_per_second"]["median"] for d in ("float32", "bfloat16"))
    out = {}
    for packing in ("stream", "documents"):
        s = by[f"slimtune/{packing}"]
        out[packing] = {
            "peak_vs_peft_bnb_best": s["peak_memory_bytes"]["median"] / bnb,
            "tokens_per_second_vs_peft_lora_best": s["tokens_per_second"]["median"] / lora,
        }
    return out


def table(res: dict) -> str:
    lines = []
    for batch, block in res["batches"].items():
        lines.append(
            f"batch {batch}: {'side':22s}{'peak MiB min/med/max':>26s}{'tokens/s min/med/max':>24s}"
            f"{'loss first -> last':>22s}"
        )
        for name, s in block["sides"].items():
            m, v = s["peak_memory_bytes"], s["tokens_per_second"]
            lines.append(
                f"{'':9s}{name + ' (' + s['compute_dtype'] + ')':28s}"
                f"{m['min'] / MiB:8.0f}{m['median'] / MiB:8.0f}{m['max'] / MiB:8.0f}"
                f"{v['min']:8.0f}{v['median']:8.0f}{v['max']:8.0f}"
                f"{s['initial_loss']:11.4f} -> {s['final_loss']:.4f}"
            )
        for packing, r in block.get("ratios", {}).items():
            lines.append(
                f"{'':9s}slimtune/{packing}: peak {r['peak_vs_peft_bnb_best']:.3f}x PEFT+bnb best (target "
                f"<= 0.6), tokens/s {r['tokens_per_second_vs_peft_lora_best']:.3f}x PEFT LoRA best "
                f"(target >= 1.0)"
            )
    d = res["device"]
    lines.append(
        f"device: {d['cpu']}, {d['threads']} threads; versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
    )
    return "\n".join(lines)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-sizes", default="2,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--sides", default=",".join(f"{s}/{v}" for s, v in SIDES), help="e.g. slimtune/stream,peft_bnb/bfloat16"
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--worker", choices=["peft_bnb", "peft_lora"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return peft_worker(a)
    from slimtune.formats.hf import resolve_model_dir

    resolve_model_dir(a.model)  # build a built-in model once, outside every timed run
    sides = [tuple(s.split("/")) for s in a.sides.split(",")]
    batches = [int(b) for b in a.batch_sizes.split(",")]
    rows: dict = {(b, s, v): [] for b in batches for s, v in sides}
    with tempfile.TemporaryDirectory(prefix="qlora_vs_peft-") as tmp:
        for run in range(a.runs):
            for b in batches:
                for s, v in sides:
                    r = one_run(a, s, v, b, Path(tmp))
                    rows[(b, s, v)].append(r)
                    print(
                        f"run {run + 1}/{a.runs} batch {b} {s}/{v}: {r['peak_memory_bytes'] / MiB:.0f} MiB, "
                        f"{r['tokens_per_second']:.0f} tok/s, loss {r['initial_loss']:.4f} -> {r['final_loss']:.4f}",
                        flush=True,
                    )
    res = {
        "config": {
            "model": a.model,
            "steps": a.steps,
            "seq_len": a.seq_len,
            "rank": a.rank,
            "alpha": 2 * a.rank,
            "runs": a.runs,
            "data": "pydoc, one token stream (no document masks)",
        },
        "device": {"cpu": cpu_name(), "threads": os.cpu_count()},
        "versions": {k: md.version(k) for k in ("torch", "transformers", "peft", "bitsandbytes", "slimtune")},
        "batches": {},
    }
    for b in batches:
        by = {f"{s}/{v}": summarize(rows[(b, s, v)]) for s, v in sides}
        block = {"sides": by}
        if len(sides) == len(SIDES):
            block["ratios"] = ratios(by)
        res["batches"][str(b)] = block
    print(table(res))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
