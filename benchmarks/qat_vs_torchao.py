"""QAT: slimtune's `qat` recipe against torchao's QATConfig (prepare -> train -> convert), and the PTQ gap it closes.

    python benchmarks/qat_vs_torchao.py                 # SmolLM2-135M, 24 steps of 4 x 256 tokens per side
    python benchmarks/qat_vs_torchao.py --model tiny-llama --steps 3 --seq-len 64 --sides ft,slimtune_int4

Every side is a fresh process that fine-tunes every weight for --steps steps on the same batches (pydoc text,
one token stream, slimtune.data's order), AdamW with the `full` recipe's lr schedule and clipping, the compute
dtype slimtune picks for this CPU (model.dtype=auto), and is then scored in fp32 on the eval split (text not
used for training, `slimtune eval ... eval.split=true`, every window):
  ft                  `slimtune run full`: the fine-tuning without quantization (FT), and its weights quantized
                      afterwards to each format (PTQ: `slimtune eval model.name=FT/final quant.method=...`)
  slimtune_<fmt>      `slimtune run qat qat.method=<fmt>`, scored on the converted final/ (a real quantized
                      checkpoint); fmt: int4, int3 (symmetric, blocks of 32, no double quant), nf3, nf3pv
                      (qat.pv_tuning=true), 8da4w (int4 + qat.activations=int8), lora_int4 (qat_lora),
                      lora_int4_lr1e-3 (the same at LoRA's lr), lq_lora_275 (the lq_lora recipe at 2.75
                      bits, against FT's NF4 PTQ with blocks of 64 and double quant: 4.13 bits), lq_lora_275_pv
                      (the same, its quantized part PV-tuned: lq_lora.pv_tuning=true), q4_0
                      (llama.cpp's grid, 16 levels like torchao's int4, compared with torchao's int4 sides)
  torchao_<fmt>       torchao QATConfig with IntxFakeQuantizeConfig(int4 | int3, group 32, symmetric) (8da4w:
                      and per-token asymmetric int8 activations) on every decoder linear (lm_head left out, as
                      slimtune does), an HF model trained by a plain loop, converted with IntxWeightOnlyConfig /
                      Int8DynamicActivationIntxWeightConfig and scored through slimtune's eval loss
Conventions differ: torchao's symmetric int-k grid has 2^k levels (-2^(k-1) .. 2^(k-1)-1), slimtune's 2^k - 1
(symmetric about 0). Gap recovered = (PTQ - QAT) / (PTQ - FT) in perplexity. peak = the training process's
VmHWM (load, training, convert); tokens/s over the training steps only. Table on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "qat_vs_torchao.json"
LOOP = SimpleNamespace(**runpy.run_path(str(ROOT / "benchmarks" / "_hf_loop.py")))  # peak_rss, train
MiB = 2**20
# slimtune side -> (recipe, overrides); PTQ format of the same name (None: no PTQ row)
SLIMTUNE = {
    "int4": ("qat", ["qat.method=int4"]),
    "int3": ("qat", ["qat.method=int3"]),
    "nf3": ("qat", ["qat.method=nf3"]),
    "nf3pv": ("qat", ["qat.method=nf3", "qat.pv_tuning=true"]),
    "8da4w": ("qat", ["qat.method=int4", "qat.activations=int8"]),
    "lora_int4": ("qat_lora", ["qat.method=int4"]),
    "int4_lowmem": ("qat", ["qat.method=int4", "optim.master_dtype=bfloat16", "optim.state_bits=8"]),
    "nf3pv_01": ("qat", ["qat.method=nf3", "qat.pv_tuning=true", "qat.pv_fraction=0.01"]),
    # llama.cpp's q4_0 grid (16 levels, as torchao's int4: d = the signed absmax / -8, fp16 d), blocks of 32
    "q4_0": ("qat", ["qat.method=q4_0"]),
    # LoRA sides at a LoRA learning rate (the lq_lora / qlora recipes' 1e-3; 5e-5 is full fine-tuning's)
    "lora_int4_lr1e-3": ("qat_lora", ["qat.method=int4", "train.lr=1e-3"]),
    # LQ-LoRA (its recipe: Fisher-weighted, NF-2/3/4 x blocks 64/128/256 with double quant) at 2.75 bits, its
    # LoRA factors trained on the exact quantized part it is stored with, against NF4 PTQ (block 64, 4.13 bits)
    "lq_lora_275": ("lq_lora", ["lq_lora.budget_bits=2.75", "quant.double_quant=true", "train.lr=1e-3"]),
    # the same with PV-Tuning of its quantized part (codes, scales and a straight-through buffer per matrix)
    "lq_lora_275_pv": (
        "lq_lora",
        ["lq_lora.budget_bits=2.75", "quant.double_quant=true", "train.lr=1e-3", "lq_lora.pv_tuning=true"],
    ),
}
# side (without its slimtune_ / torchao_ prefix) -> the family it is compared within: the same PTQ format (and
# activations); a torchao side ending in _fp32 keeps fp32 master weights under bf16 autocast, as slimtune does
FAMILY = {"int4": "int4", "int3": "int3", "nf3": "nf3", "nf3pv": "nf3", "8da4w": "8da4w", "lora_int4": "int4"}
FAMILY |= {"nf3pv_01": "nf3", "int4_lowmem": "int4", "int4_fp32": "int4", "int3_fp32": "int3", "8da4w_fp32": "8da4w"}
FAMILY |= {"lora_int4_lr1e-3": "int4", "lq_lora_275": "nf4_b64", "lq_lora_275_pv": "nf4_b64", "q4_0": "q4_0"}
RIVAL = {"q4_0": "int4"}  # family -> the torchao family a slimtune side is compared with (default: its own)
PTQ = {"8da4w": "int4"}  # family -> PTQ format of FT's weights (default: the family's name)
# PTQ format -> how FT's weights are quantized (default: quant.method=<format>, blocks of 32, no double quant)
PTQ_ARGS = {"nf4_b64": ["quant.method=nf4", "quant.block_size=64", "quant.double_quant=true"]}
TORCHAO = {"int4": (4, False), "int3": (3, False), "8da4w": (4, True)}
DEFAULT_SIDES = "ft,slimtune_int4,torchao_int4,slimtune_int3,torchao_int3,slimtune_nf3,slimtune_nf3pv"


def common(a, out: str) -> list[str]:
    return [
        f"model.name={a.model}",
        "data.source=pydoc",
        "data.packing=stream",
        f"train.seq_len={a.seq_len}",
        f"train.batch_size={a.batch_size}",
        f"train.max_steps={a.steps}",
        f"train.lr={a.lr}",
        "quant.block_size=32",
        "quant.double_quant=false",
        "eval.max_batches=1",
        "checkpoint.every=0",
        "logging.progress=false",
        f"output_dir={out}",
        "overwrite=true",
    ]


def torchao_worker(a) -> None:
    """One torchao QAT run in this process; writes its result JSON (with the converted model's eval) to a.out."""
    import warnings

    import torch
    import transformers
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    from slimtune import config as C
    from slimtune.data import splits_for
    from slimtune.formats.hf import DTYPES, load_tokenizer, resolve_model_dir
    from slimtune.hardware import resolve_dtype
    from slimtune.lm_loss import CausalLMLoss
    from slimtune.trainer.evaluate import loss_totals

    bits, act = TORCHAO[a.worker.removesuffix("_fp32")]
    cfg, _ = resolve_dtype(C.load_config("full", common(a, "unused")), "cpu")  # model.dtype=auto, as slimtune
    t, dtype = cfg.train, DTYPES[cfg.model.dtype]
    # _fp32: fp32 master weights (and AdamW state) with the compute under autocast; else the weights themselves
    # in the compute dtype (an HF model loaded in bf16 and trained as it is)
    master = torch.float32 if a.worker.endswith("_fp32") else dtype
    torch.manual_seed(t.seed)
    data = splits_for(cfg, load_tokenizer(a.model))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(a.model), dtype=master)
    model.config.use_cache = False
    weight = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=32, is_symmetric=True)
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if act else None

    def decoder_linear(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")

    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"), decoder_linear)
    if t.activation_checkpointing:  # as the `full` recipe trains
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.autocast("cpu", dtype=dtype, enabled=master != dtype):
        losses, seconds = LOOP.train(model, cfg, data)
    model = model.float()  # scored in fp32, as `slimtune eval` scores slimtune's converted checkpoints
    base = (
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=getattr(torch, f"int{bits}"), weight_granularity=PerGroup(32)
        )
        if act
        else IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(32))
    )
    quantize_(model, QATConfig(base, step="convert"), decoder_linear)
    model.eval()
    nats, tokens = loss_totals(
        CausalLMLoss(model, t.loss_chunk_tokens), data.eval, t.batch_size, 0, torch.device("cpu")
    )
    Path(a.out).write_text(
        json.dumps(
            {
                "peak_memory_bytes": LOOP.peak_rss(),
                "tokens_per_second": t.max_steps * t.batch_size * t.seq_len / seconds,
                "initial_loss": losses[0],
                "final_loss": losses[-1],
                "eval_perplexity": float(torch.tensor(nats / tokens).exp()),
                "compute_dtype": str(dtype).removeprefix("torch."),
                "master_dtype": str(master).removeprefix("torch."),
            }
        )
    )


def _run(cmd: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"qat_vs_torchao: failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def evaluate(a, model: str, *extra: str) -> float:
    out = _run(
        [sys.executable, "-m", "slimtune", "eval", f"model.name={model}", f"train.seq_len={a.seq_len}"]
        + [f"train.batch_size={a.batch_size}", "eval.split=true", "eval.max_batches=0", *extra]
    )
    return json.loads(out.strip().splitlines()[-1])["eval_perplexity"]


def slimtune_side(a, name: str, tmp: Path) -> dict:
    recipe, extra = ("full", []) if name == "ft" else SLIMTUNE[name.removeprefix("slimtune_")]
    out = tmp / name
    _run([sys.executable, "-m", "slimtune", "run", recipe, *common(a, str(out)), *extra])
    r = json.loads((out / "report.json").read_text())
    row = {k: r[k] for k in ("peak_memory_bytes", "tokens_per_second", "initial_loss", "final_loss", "compute_dtype")}
    row["eval_perplexity"] = evaluate(a, str(out / "final"))
    manifest = out / "final" / "slimtune_quant.json"
    if manifest.is_file():  # a quantized final/: its bits per quantized parameter (codes + scales)
        row["bits_per_param"] = json.loads(manifest.read_text())["bits_per_param"]
    if name == "ft":
        fams = {FAMILY[s.split("_", 1)[1]] for s in a.sides.split(",") if s != "ft"}
        fmts = sorted({PTQ.get(f, f) for f in fams})
        default = ["quant.block_size=32", "quant.double_quant=false"]
        row["ptq"] = {
            f: evaluate(a, str(out / "final"), *PTQ_ARGS.get(f, [f"quant.method={f}", *default])) for f in fmts
        }
    return row


def torchao_side(a, name: str, tmp: Path) -> dict:
    res = tmp / f"{name}.json"
    args = ["--worker", name.removeprefix("torchao_"), "--model", a.model, "--steps", str(a.steps)]
    args += ["--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--out", str(res)]
    _run([sys.executable, str(Path(__file__).resolve()), *args])
    return json.loads(res.read_text())


def gaps(rows: dict) -> dict:
    """Per QAT side: the PTQ gap it recovers, and a slimtune side's ratios against each torchao side of its
    family."""
    ft = rows.get("ft")
    out = {}
    for name, r in rows.items():
        if name == "ft" or ft is None:
            continue
        family = FAMILY[name.split("_", 1)[1]]
        ptq = ft["ptq"].get(PTQ.get(family, family))
        g = {"ptq": ptq, "ft": ft["eval_perplexity"], "qat": r["eval_perplexity"]}
        if ptq is not None and ptq != ft["eval_perplexity"]:
            g["gap_recovered"] = (ptq - r["eval_perplexity"]) / (ptq - ft["eval_perplexity"])
        if name.startswith("slimtune_"):
            for other, tao in rows.items():
                if other.startswith("torchao_") and FAMILY[other.split("_", 1)[1]] == RIVAL.get(family, family):
                    g[f"vs_{other}"] = {
                        "peak": r["peak_memory_bytes"] / tao["peak_memory_bytes"],
                        "tokens_per_second": r["tokens_per_second"] / tao["tokens_per_second"],
                        "perplexity": r["eval_perplexity"] / tao["eval_perplexity"],
                    }
        out[name] = g
    return out


def table(res: dict) -> str:
    lines = [f"{'side':20s}{'peak MiB':>10s}{'tok/s':>8s}{'loss first -> last':>22s}{'eval ppl':>10s}{'PTQ ppl':>9s}"]
    lines[0] += f"{'gap recovered':>15s}"
    for name, r in res["sides"].items():
        g = res["gaps"].get(name, {})
        ptq = g.get("ptq")
        lines.append(
            f"{name:20s}{r['peak_memory_bytes'] / MiB:10.0f}{r['tokens_per_second']:8.1f}"
            f"{r['initial_loss']:11.4f} -> {r['final_loss']:.4f}{r['eval_perplexity']:10.3f}"
            f"{ptq if ptq is not None else float('nan'):9.3f}"
            f"{g.get('gap_recovered', float('nan')) * 100:14.1f}%"
        )
        for key, v in g.items():
            if key.startswith("vs_"):
                lines.append(
                    f"{'':20s}{key}: peak {v['peak']:.3f}x (target <= 0.8), tokens/s {v['tokens_per_second']:.3f}x "
                    f"(>= 1.0), perplexity {v['perplexity']:.4f}x"
                )
    ft = res["sides"].get("ft")
    if ft:
        lines.append("PTQ of FT: " + ", ".join(f"{k} {v:.3f}" for k, v in ft["ptq"].items()))
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:  # torchao: only the torchao sides need it
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--sides", default=DEFAULT_SIDES)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--ft-from", help="take the ft side (FT and PTQ perplexities) from an earlier results JSON")
    ap.add_argument("--worker", choices=sorted(TORCHAO) + [f"{k}_fp32" for k in TORCHAO], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return torchao_worker(a)
    from slimtune.formats.hf import resolve_model_dir

    resolve_model_dir(a.model)  # a built-in model is converted once, outside every timed run
    rows, started = {}, time.time()
    if a.ft_from:  # its config must be this run's: same model, steps, batches and lr
        earlier = json.loads(Path(a.ft_from).read_text())
        rows["ft"] = earlier["sides"]["ft"]
        same = {k: earlier["config"][k] for k in ("model", "steps", "seq_len", "batch_size", "lr")}
        if same != {"model": a.model, "steps": a.steps, "seq_len": a.seq_len, "batch_size": a.batch_size, "lr": a.lr}:
            sys.exit(f"qat_vs_torchao: --ft-from {a.ft_from} ran another configuration ({same})")
    with tempfile.TemporaryDirectory(prefix="qat_vs_torchao-") as tmp:
        for name in a.sides.split(","):
            t0 = time.time()
            side = torchao_side if name.startswith("torchao_") else slimtune_side
            rows[name] = side(a, name, Path(tmp))
            print(f"{name}: {json.dumps(rows[name])} ({time.time() - t0:.0f}s)", flush=True)
    res = {
        "config": {
            "model": a.model,
            "steps": a.steps,
            "seq_len": a.seq_len,
            "batch_size": a.batch_size,
            "tokens": a.steps * a.seq_len * a.batch_size,
            "lr": a.lr,
            "group": 32,
            "minutes": round((time.time() - started) / 60, 1),
        },
        "device": {
            "cpu": next(
                (
                    x.split(":", 1)[1].strip()
                    for x in Path("/proc/cpuinfo").read_text().splitlines()
                    if x.startswith("model name")
                ),
                "unknown",
            ),
            "threads": os.cpu_count(),
        },
        "versions": {k: _version(k) for k in ("torch", "transformers", "torchao", "slimtune")},
        "sides": rows,
        "gaps": gaps(rows),
    }
    print(table(res))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
