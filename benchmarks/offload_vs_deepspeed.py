"""slimtune's disk offload vs DeepSpeed ZeRO-3 NVMe offload vs in-RAM torch: full fine-tuning of a random 1.0B
Llama (16 layers, hidden 2048, intermediate 5440, 32 heads, vocab 49152, untied), fp32, AdamW, seq 256, batch 1,
without gradient clipping, and with `--clip 1.0` every side clipping at 1.0 (rows `<side>_clip`). Each side runs in
its own process on this machine; printed side by side with ratios and
written to benchmarks/results/offload_vs_deepspeed.json.

    python benchmarks/offload_vs_deepspeed.py                     # all three (DeepSpeed: apt libaio-dev, pip deepspeed)
    python benchmarks/offload_vs_deepspeed.py --sides slimtune    # one side (the others' last results are kept)
    python benchmarks/offload_vs_deepspeed.py --clip 1.0          # the same with clipping on every side
    python benchmarks/offload_vs_deepspeed.py --scale             # 2.1B (24 layers, hidden 2560): 2 steps, a checkpoint
    python benchmarks/offload_vs_deepspeed.py --scale --no-checkpoint --beside-job   # the same beside a competing job

Steady state = the steps after the first (slimtune: the `seconds` column of metrics.jsonl). Peak RSS: the whole
process (ru_maxrss of the child). Bytes read/written per step: /proc/<pid>/io of the child (storage, not page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "offload_vs_deepspeed.json"
SHAPES = {
    "1b": dict(layers=16, hidden=2048, intermediate=5440),
    "2.1b": dict(layers=24, hidden=2560, intermediate=7040),
}


def make_model(path: Path, layers: int, hidden: int, intermediate: int, dtype: str = "float32") -> None:
    """A random Llama written shard by shard (each layer made, saved, dropped: no full model in memory), its
    tensors in `dtype`."""
    if (path / "config.json").is_file():
        return
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from slimtune.formats.hf import resolve_model_dir

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(0)
    weight_map, shard = {}, 0

    def save(tensors: dict) -> None:
        nonlocal shard
        shard += 1
        name = f"model-{shard:05d}.safetensors"
        tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    std = cfg.initializer_range
    save({"model.embed_tokens.weight": torch.randn(cfg.vocab_size, hidden) * std})
    for i in range(layers):
        with torch.no_grad():
            layer = LlamaDecoderLayer(cfg, i)
        save({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
        del layer
    save({"model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(cfg.vocab_size, hidden) * std})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.dtype = dtype
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m")).save_pretrained(tmp)
    tmp.rename(path)


COMPETING_JOB = """
import os, sys, time, torch
torch.set_num_threads(2)
a, buf, path = torch.randn(1024, 1024), os.urandom(64 << 20), sys.argv[1]
while True:
    t = time.time()
    while time.time() - t < 2:
        a = torch.tanh(a @ a)
    with open(path, "wb") as f:
        for _ in range(32):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    os.remove(path)
"""


def run_child(cmd: list[str], env: dict | None = None, disk: Path | None = None) -> tuple[int, dict, float]:
    """(peak RSS bytes of that child, its last /proc io counters (+ "disk_peak_bytes": the most the file
    system of `disk` filled up while it ran), wall seconds)."""
    t = time.perf_counter()
    start_free = shutil.disk_usage(disk).free if disk else 0
    min_free = start_free
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=ROOT)
    io = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            io = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
        except OSError:
            pass
        if disk:
            min_free = min(min_free, shutil.disk_usage(disk).free)
        time.sleep(0.5)
    if disk:
        io["disk_peak_bytes"] = start_free - min_free
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"offload_vs_deepspeed: {' '.join(cmd)} failed (exit {code})")
    return usage.ru_maxrss * 1024, {k: int(v) for k, v in io.items()}, time.perf_counter() - t


def slimtune_side(model: Path, work: Path, steps: int, scale: bool, clip: float = 0.0, checkpoint: bool = True) -> dict:
    out = work / "slimtune"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        f"model.name={model}",
        "train.seq_len=256",
        "train.batch_size=1",
        f"train.max_steps={steps}",
        f"train.max_grad_norm={clip}",
        "train.warmup_steps=1",
        "train.lr=1e-4",
        "eval.max_batches=1",
        "data.eval_fraction=0.005",
        "logging.progress=false",
        "engine.name=offload",
        "offload.prefetch=1",
        f"output_dir={out}",
    ]
    if scale:
        args += ["checkpoint.every=1", "checkpoint.keep=1"] if checkpoint else ["checkpoint.every=0"]
    peak, io, wall = run_child([sys.executable, "-m", "slimtune", "run", "full", *args], disk=work if scale else None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + rows, rows)]
    report = json.loads((out / "report.json").read_text())
    off = report["offload"]
    result = {
        "seconds_per_step": secs,
        "steady_seconds_per_step": _mean(secs[1:]),
        "peak_rss_bytes": peak,
        "read_bytes": io.get("read_bytes"),
        "written_bytes": io.get("write_bytes"),
        "wall_seconds": wall,
        "read_bytes_per_step": off["bytes_read_per_step"],
        "written_bytes_per_step": off["bytes_written_per_step"],
        "io_hidden_fraction": off["io_hidden_fraction"],
        "gb_per_second": off["gb_per_second"],
        "buffer_pool_bytes": off["buffer_pool_bytes"],
        "losses": [r["loss"] for r in rows],
        "activations": off.get("activations"),
        "report_peak_bytes": report.get("peak_memory_bytes"),
    }
    if scale:  # the source model, plus the most the run added at once (store, snapshot, final/)
        result["disk_bytes"] = _du(model) + io["disk_peak_bytes"]
        result["eval_perplexity"] = [report["eval_perplexity_before"], report["eval_perplexity"]]
    shutil.rmtree(out / "final", ignore_errors=True)
    return result


def deepspeed_side(model: Path, work: Path, steps: int, clip: float = 0.0) -> dict:
    nvme = work / "deepspeed_nvme"
    shutil.rmtree(nvme, ignore_errors=True)
    nvme.mkdir(parents=True)
    out = work / "deepspeed.json"
    peak, io, wall = run_child(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "_deepspeed_worker.py"),
            str(model),
            str(nvme),
            str(steps),
            "256",
            str(out),
        ],
        env={"BENCH_MAX_GRAD_NORM": str(clip)},
    )
    r = json.loads(out.read_text())
    secs = [s["seconds"] for s in r["steps"]]
    shutil.rmtree(nvme, ignore_errors=True)
    return {
        "seconds_per_step": secs,
        "steady_seconds_per_step": _mean(secs[1:]),
        "peak_rss_bytes": peak,
        "init_seconds": r["init_seconds"],
        "read_bytes_per_step": _mean([s["read_bytes"] for s in r["steps"][1:]]),
        "written_bytes_per_step": _mean([s["written_bytes"] for s in r["steps"][1:]]),
        "wall_seconds": wall,
        "deepspeed": r["deepspeed"],
        "losses": [s["loss"] for s in r["steps"]],
    }


def in_ram_side(model: Path, work: Path, steps: int, clip: float = 0.0) -> dict:
    out = work / "in_ram"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        f"model.name={model}",
        "train.seq_len=256",
        "train.batch_size=1",
        f"train.max_steps={steps}",
        f"train.max_grad_norm={clip}",
        "train.warmup_steps=1",
        "train.lr=1e-4",
        "eval.max_batches=1",
        "data.eval_fraction=0.005",
        "logging.progress=false",
        f"output_dir={out}",
    ]
    peak, io, wall = run_child([sys.executable, "-m", "slimtune", "run", "full", *args])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + rows, rows)]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds_per_step": secs,
        "steady_seconds_per_step": _mean(secs[1:]),
        "peak_rss_bytes": peak,
        "wall_seconds": wall,
        "losses": [r["loss"] for r in rows],
    }


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def table(res: dict, suffix: str = "") -> str:
    s, d, m = res.get("slimtune" + suffix), res.get("deepspeed" + suffix), res.get("in_ram" + suffix)

    def cell(side, key, scale=1.0, f=".1f"):
        return "-" if not side or side.get(key) is None else format(side[key] / scale, f)

    def tokens(side):
        return "-" if not side else format(256 / side["steady_seconds_per_step"], ".1f")

    speed = "-" if not (s and d) else format(d["steady_seconds_per_step"] / s["steady_seconds_per_step"], ".2f") + "x"
    mem = "-" if not (s and d) else format(s["peak_rss_bytes"] / d["peak_rss_bytes"], ".2f") + "x"
    ram = "-" if not (s and m) else format(m["steady_seconds_per_step"] / s["steady_seconds_per_step"], ".2f") + "x"
    clipping = "clipping at 1.0" if suffix else "no clipping"
    rows = [
        f"| 1.0B Llama, fp32, seq 256, batch 1, {clipping} | slimtune offload | DeepSpeed ZeRO-3 NVMe | in-RAM torch "
        "| slimtune vs DeepSpeed | slimtune vs in-RAM |",
        "|---|---|---|---|---|---|",
        f"| s/step (steady) | {cell(s, 'steady_seconds_per_step')} | {cell(d, 'steady_seconds_per_step')} | "
        f"{cell(m, 'steady_seconds_per_step')} | | |",
        f"| tokens/s | {tokens(s)} | {tokens(d)} | {tokens(m)} | {speed} | {ram} |",
        f"| peak RSS (GB) | {cell(s, 'peak_rss_bytes', 1e9, '.2f')} | {cell(d, 'peak_rss_bytes', 1e9, '.2f')} | "
        f"{cell(m, 'peak_rss_bytes', 1e9, '.2f')} | {mem} | |",
    ]
    if s and d:
        rows.append(
            f"| GB read / written per step | {s['read_bytes_per_step'] / 1e9:.1f} / "
            f"{s['written_bytes_per_step'] / 1e9:.1f} | {d['read_bytes_per_step'] / 1e9:.1f} / "
            f"{d['written_bytes_per_step'] / 1e9:.1f} | - | | |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", nargs="+", default=["slimtune", "deepspeed", "in_ram"])
    ap.add_argument("--work", default="/tmp/slimtune-offload-bench")
    ap.add_argument("--scale", action="store_true", help="the 2.1B run (slimtune only, 2 steps, checkpoint)")
    ap.add_argument("--clip", type=float, default=0.0, help="train.max_grad_norm on every side (0: none)")
    ap.add_argument("--no-checkpoint", action="store_true", help="--scale without its checkpoint (~26 GB less disk)")
    ap.add_argument(
        "--beside-job",
        action="store_true",
        help="slimtune only (with --scale: the 2.1B run), with a competing job running (2 threads of matmuls, 2 GB "
        "written and read back in a loop): its peak against the same side alone (rows *_beside_job)",
    )
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    res["machine"] = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if a.beside_job:  # slimtune's side only (1.0B, or the 2.1B run with --scale), beside a competing job
        model = work / ("llama-2.1b" if a.scale else "llama-1b")
        make_model(model, **SHAPES["2.1b" if a.scale else "1b"])
        row = "scale_2.1b_beside_job" if a.scale else "slimtune_beside_job"
        job = subprocess.Popen([sys.executable, "-c", COMPETING_JOB, str(work / "competing.bin")])
        try:
            res[row] = slimtune_side(model, work, 2 if a.scale else 4, a.scale, a.clip, not a.no_checkpoint)
        finally:
            job.kill()
            job.wait()
            (work / "competing.bin").unlink(missing_ok=True)
        print(json.dumps(res[row]), flush=True)
    elif a.scale:
        model = work / "llama-2.1b"
        make_model(model, **SHAPES["2.1b"])
        row = "scale_2.1b_no_checkpoint" if a.no_checkpoint else "scale_2.1b"
        res[row] = slimtune_side(model, work, 2, True, a.clip, not a.no_checkpoint)
        print(json.dumps(res[row], indent=1))
    else:
        model = work / "llama-1b"
        make_model(model, **SHAPES["1b"])
        suffix = "_clip" if a.clip > 0 else ""
        for side in a.sides:
            res[side + suffix] = {
                "slimtune": lambda: slimtune_side(model, work, 4, False, a.clip),
                "deepspeed": lambda: deepspeed_side(model, work, 3, a.clip),
                "in_ram": lambda: in_ram_side(model, work, 4, a.clip),
            }[side]()
            res[side + suffix]["max_grad_norm"] = a.clip
            print(side + suffix, json.dumps(res[side + suffix]), flush=True)
            save(res)  # a later side failing keeps this one
        print(table(res))
        print(table(res, "_clip"))
    save(res)


def save(res: dict, path: Path = RESULTS) -> None:
    """The results, written atomically (a later failure keeps what was measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
