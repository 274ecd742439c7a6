"""QLoRA, slimtune vs PEFT + bitsandbytes: the same run, peak memory and training throughput side by side.

    python benchmarks/qlora_vs_peft.py                      # SmolLM2-135M, 30 steps (minutes on a CPU)
    python benchmarks/qlora_vs_peft.py --model tiny-llama --steps 3 --seq-len 64 --batch-size 2 --rank 4

The run: model.name (default smollm2-135m), pydoc data, seq 256, batch 4, LoRA r=16 alpha=32 dropout 0 on
every linear but lm_head, frozen NF4 base (blocks of 64, double-quant), fp32 compute, AdamW + warmup/cosine
lr + clip 1.0 from the `qlora` recipe, 30 steps. Both sides see the very same batches (slimtune.data).
  (a) slimtune: `python -m slimtune run qlora ...` -> its report.json.
  (b) PEFT: transformers + BitsAndBytesConfig(nf4, double quant) + get_peft_model, HF's own loss.
Measured, each side in its own fresh process (so one side's allocations never count against the other):
  peak memory = peak RSS of that process (ru_maxrss; model load and eval included);
  tokens/s    = steps * batch * seq_len / seconds of the training steps only (no load, no eval);
  initial/final loss = the training loss of the first and last step (same batches, so comparable).
Results: a table on stdout and JSON in --out (default benchmarks/results/qlora_vs_peft.json).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "qlora_vs_peft.json"
MiB = 2**20


def overrides(a: argparse.Namespace, output_dir: str) -> list[str]:
    """The run, as slimtune `key=value` overrides of the qlora recipe. The PEFT worker loads the same
    config from these, so lr, warmup, seed, betas, eps and clipping are identical by construction."""
    return [f"model.name={a.model}", "data.source=pydoc", f"train.seq_len={a.seq_len}",
            f"train.batch_size={a.batch_size}", "train.grad_accum=1", f"train.max_steps={a.steps}",
            f"adapter.rank={a.rank}", f"adapter.alpha={2 * a.rank}", "adapter.dropout=0.0",
            "adapter.target_modules=all-linear", "model.dtype=float32", "quant.method=nf4",
            "quant.backend=slimtune", "quant.double_quant=true", "quant.block_size=64",
            "optim.name=adamw", "train.activation_checkpointing=false",
            # the smallest possible eval and no mid-run checkpoints: neither is timed, but both add wall time
            "eval.max_batches=1", "eval.every=0", "checkpoint.every=0", "logging.progress=false",
            "logging.wandb=false", f"output_dir={output_dir}", "overwrite=true"]


def peft_worker(a: argparse.Namespace) -> None:
    """Side (b), run in its own process by the parent: writes its result JSON to a.out."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    transformers.logging.set_verbosity_error()  # as slimtune's CLI: no load progress bars or notices
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls a deprecated HF property

    from slimtune import config as C
    from slimtune.data import BatchOrder, build_splits, micro_batch
    from slimtune.models import load_tokenizer, resolve_model_dir
    from slimtune.trainer.loop import lr_at

    cfg = C.load_config("qlora", overrides(a, "unused"))
    t = cfg.train
    torch.manual_seed(t.seed)
    data = build_splits(cfg.data.source, load_tokenizer(a.model), t.seq_len, cfg.data.eval_fraction)
    # bitsandbytes >= 0.45 has CPU kernels, so from_pretrained quantizes on CPU directly (no manual swap of
    # nn.Linear for bnb.nn.Linear4bit needed). It quantizes every linear but lm_head (kept fp32, tied to
    # the embeddings), blocks of 64 -- the same set and layout as slimtune's nf4.
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(a.model), quantization_config=qcfg,
                                                 dtype=torch.float32)
    model.config.use_cache = False  # as slimtune: no KV cache is built in training forwards
    # No peft.prepare_model_for_kbit_training: it upcasts the non-quantized weights and turns on gradient
    # checkpointing, which slimtune does not do here either (like for like: neither side checkpoints).
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    # slimtune's optimizer: AdamW from the recipe, foreach=False (one parameter's temporaries at a time)
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, foreach=False)
    order = BatchOrder(len(data.train), t.seed)
    losses, train_seconds = [], 0.0
    model.train()
    for step in range(t.max_steps):
        t0 = time.perf_counter()  # as slimtune's loop: the clock covers the whole step, batch fetch included
        torch.manual_seed(t.seed * 1_000_003 + step * 1009)  # slimtune's per-step seed (no dropout anyway)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        x, y, _ = micro_batch(data.train, order, step, 0, 0, 1, t.batch_size, 1)  # stream packing: no positions
        # HF's ordinary loss: full (B, T, V) fp32 logits, mean CE over the shifted targets
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() syncs, so the step is over when the clock stops
        train_seconds += time.perf_counter() - t0
    result = {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "peak_memory_kind": "cpu_peak_rss",
        "tokens_per_second": t.max_steps * t.batch_size * t.seq_len / max(train_seconds, 1e-9),
        "initial_loss": losses[0], "final_loss": losses[-1], "steps": t.max_steps,
        "train_seconds": train_seconds, "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in params),
    }
    Path(a.out).write_text(json.dumps(result))


def run_child(cmd: list[str], env: dict, what: str) -> float:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    if rc != 0:
        sys.exit(f"qlora_vs_peft: the {what} run failed (exit {rc}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(res: dict) -> str:
    s, p, r = res["slimtune"], res["peft"], res["ratios"]
    rows = [("peak memory (MiB)", s["peak_memory_bytes"] / MiB, p["peak_memory_bytes"] / MiB, r["peak_memory"], ".1f"),
            ("tokens/s (train steps)", s["tokens_per_second"], p["tokens_per_second"], r["tokens_per_second"], ".1f"),
            ("initial loss", s["initial_loss"], p["initial_loss"], None, ".4f"),
            ("final loss", s["final_loss"], p["final_loss"], None, ".4f"),
            ("trainable params", s["trainable_params"], p["trainable_params"], None, ",d"),
            ("process wall (s, incl. load)", s["process_seconds"], p["process_seconds"], None, ".1f")]
    out = [f"{'':30s}{'slimtune':>14s}{'PEFT+bnb':>14s}{'slimtune/PEFT':>15s}"]
    for name, a, b, ratio, fmt in rows:
        out.append(f"{name:30s}{format(a, fmt):>14s}{format(b, fmt):>14s}"
                   f"{(format(ratio, '.2f') + 'x') if ratio is not None else '':>15s}")
    d, c, v = res["device"], res["config"], res["versions"]
    out.append(f"device: {d['cpu']}, {d['threads']} torch threads ({d['logical_cpus']} logical CPUs), "
               f"MALLOC_MMAP_THRESHOLD_={d['MALLOC_MMAP_THRESHOLD_']}")
    out.append(f"run: {c['model']}, {c['steps']} steps, seq {c['seq_len']} x batch {c['batch_size']}, "
               f"LoRA r={c['rank']} alpha={c['alpha']}, nf4 + double quant, fp32 compute")
    out.append("versions: " + ", ".join(f"{k} {v[k]}" for k in v))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny-llama | local HF dir")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank; alpha = 2 x rank")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in both runs (0 = torch's default)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON")
    ap.add_argument("--worker", choices=["peft"], help=argparse.SUPPRESS)  # internal: run one side only
    a = ap.parse_args()
    if a.worker == "peft":
        return peft_worker(a)

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if a.threads:
        # slimtune's CLI has no threads option: torch sizes its intra-op pool from OMP_NUM_THREADS at
        # import, which is torch.set_num_threads(n) before any work; the PEFT worker gets both.
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    from slimtune.models import resolve_model_dir

    resolve_model_dir(a.model)  # materialise a built-in model once here, so neither timed side pays for it
    with tempfile.TemporaryDirectory(prefix="qlora_vs_peft-") as tmp:
        run_dir, peft_json = Path(tmp) / "slimtune_run", Path(tmp) / "peft.json"
        print("== slimtune", flush=True)
        st_wall = run_child([sys.executable, "-m", "slimtune", "run", "qlora", *overrides(a, str(run_dir))],
                            env, "slimtune")
        slim = json.loads((run_dir / "report.json").read_text())
        print("== PEFT + bitsandbytes", flush=True)
        pf_wall = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", "peft",
                             "--model", a.model, "--steps", str(a.steps), "--seq-len", str(a.seq_len),
                             "--batch-size", str(a.batch_size), "--rank", str(a.rank),
                             "--threads", str(a.threads), "--out", str(peft_json)], env, "PEFT")
        peft = json.loads(peft_json.read_text())
    keep = ("peak_memory_bytes", "peak_memory_kind", "tokens_per_second", "initial_loss", "final_loss",
            "steps", "trainable_params")
    slim = {k: slim[k] for k in keep} | {"train_seconds": slim["wall_seconds"], "process_seconds": st_wall}
    peft["process_seconds"] = pf_wall
    res = {
        "config": {"model": a.model, "data": "pydoc", "steps": a.steps, "seq_len": a.seq_len,
                   "batch_size": a.batch_size, "rank": a.rank, "alpha": 2 * a.rank, "dropout": 0.0,
                   "target_modules": "all-linear (not lm_head)", "quant": "nf4, block 64, double quant",
                   "compute_dtype": "float32"},
        "device": {"cpu": cpu_name(), "threads": peft.pop("threads"), "logical_cpus": os.cpu_count(),
                   # glibc's dynamic mmap threshold fragments the CPU heap; peak RSS depends on it
                   "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")},
        "versions": {k: md.version(k) for k in ("torch", "transformers", "peft", "bitsandbytes", "slimtune")},
        "slimtune": slim,
        "peft": peft,
        "ratios": {"peak_memory": slim["peak_memory_bytes"] / peft["peak_memory_bytes"],
                   "tokens_per_second": slim["tokens_per_second"] / peft["tokens_per_second"]},
    }
    print(table(res))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
