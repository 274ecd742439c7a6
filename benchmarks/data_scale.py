"""Data at scale: slimtune's token cache against Hugging Face `datasets.map`, and what a large source costs a run.

The corpus is made here, with no download: every pydoc topic (`pydoc_data.topics`) and every docstring of the
standard library's modules and their public members, cut into paragraphs, shuffled (seed 0) and written as
`{"text": ...}` records of 1-4 paragraphs, repeated in a new shuffle each pass until the file reaches the size
asked for. With the SmolLM2 tokenizer, for each size:
  - tokenization: slimtune's cache build (`data.num_proc=2`) against `datasets.load_dataset("json")` +
    `.map(tokenizer, batched=True, num_proc=2)` on the same file, each in a fresh process (ratio: datasets'
    seconds / slimtune's; target >= 1.0), and the cache's bytes per token (target <= 2.2);
  - a LoRA run of SmolLM2 (`slimtune run lora`, 20 steps at 1 GiB, 2 at 300 MB) on the file, the cache
    already built, against the same run on pydoc: peak RSS difference (target <= 200 MiB) and wall-time
    difference (launch to exit, same model load on both sides; targets <= 10 s / 15 s).

  python benchmarks/data_scale.py                 # 0.3 and 1.0 GiB (~30 min on 2 cores)
  python benchmarks/data_scale.py --gib 0.3       # one size
Writes benchmarks/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path.pop(0)
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"


def paragraphs() -> list[str]:
    import importlib
    import inspect
    import pkgutil

    from pydoc_data.topics import topics

    texts = list(topics.values())
    for info in pkgutil.iter_modules([os.path.dirname(os.__file__)]):  # the standard library only
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib", "tkinter", "turtle"):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001  (any stdlib module that cannot import here is skipped)
            continue
        texts.append(inspect.getdoc(module) or "")
        for name, obj in vars(module).items():
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                texts.append(inspect.getdoc(obj) or "")
    return [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 40]


def make_corpus(path: Path, nbytes: int) -> dict:
    paras, rng, written, records, passes = paragraphs(), random.Random(0), 0, 0, 0
    with open(path, "w") as f:
        while written < nbytes:
            rng.shuffle(paras)
            passes += 1
            i = 0
            while i < len(paras) and written < nbytes:
                k = rng.randint(1, 4)
                line = json.dumps({"text": "\n\n".join(paras[i : i + k])}) + "\n"
                f.write(line)
                written, records, i = written + len(line.encode()), records + 1, i + k
    return {"bytes": written, "records": records, "paragraphs": len(paras), "passes": passes}


def timed(code: str, *args: str) -> dict:
    """Run python -c code in a fresh process; its last stdout line is JSON."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "wall_seconds": round(time.perf_counter() - t0, 2)}


SLIMTUNE_BUILD = """
import json, sys, time
from slimtune.data import token_file
from slimtune.formats.hf import load_tokenizer
tok = load_tokenizer(sys.argv[1])
t0 = time.perf_counter()
tf = token_file(sys.argv[2], tok, cache_dir=sys.argv[3], progress=False, num_proc=2)
seconds = time.perf_counter() - t0
size = sum(f.stat().st_size for f in tf.path.iterdir() if f.suffix == ".bin")
print(json.dumps({"seconds": seconds, "tokens": len(tf), "bytes_on_disk": size}))
"""

DATASETS_MAP = """
import json, sys, time
from datasets import load_dataset
from slimtune.formats.hf import load_tokenizer
tok = load_tokenizer(sys.argv[1])
t0 = time.perf_counter()
ds = load_dataset("json", data_files=sys.argv[2], split="train", cache_dir=sys.argv[3])
ds = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, num_proc=2, remove_columns=["text"])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rows": len(ds)}))
"""


def run(source: str, steps: int, out: Path, cache: Path) -> dict:
    args = [
        sys.executable,
        "-m",
        "slimtune",
        "run",
        "lora",
        f"data.source={source}",
        f"data.cache_dir={cache}",
        f"train.max_steps={steps}",
        "eval.max_batches=2",
        "checkpoint.every=0",
        "logging.progress=false",
        f"output_dir={out}",
        "overwrite=true",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    return {
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": report["peak_memory_bytes"] / 2**20,
        "train_blocks": report["train_blocks"],
    }


def measure(gib: float, work: Path) -> dict:
    src, cache = work / f"corpus_{gib:g}gib.jsonl", work / "cache"
    corpus = make_corpus(src, int(gib * 2**30))
    mine = timed(SLIMTUNE_BUILD, MODEL, str(src), str(cache))
    theirs = timed(DATASETS_MAP, MODEL, str(src), str(work / "hf_cache"))
    steps = 20 if gib >= 1 else 2
    run("pydoc", steps, work / "warm", cache)  # the model converted and the pydoc cache built: both runs hit
    on_pydoc = run("pydoc", steps, work / "pydoc", cache)
    on_file = run(str(src), steps, work / "file", cache)
    return {
        "corpus": corpus,
        "tokens": mine["tokens"],
        "slimtune_tokenize_seconds": round(mine["seconds"], 2),
        "datasets_map_seconds": round(theirs["seconds"], 2),
        "speed_vs_datasets": round(theirs["seconds"] / mine["seconds"], 3),
        "cache_bytes_per_token": round(mine["bytes_on_disk"] / mine["tokens"], 4),
        f"run_{steps}_steps_pydoc": on_pydoc,
        f"run_{steps}_steps_file": on_file,
        "rss_over_pydoc_mib": round(on_file["peak_rss_mib"] - on_pydoc["peak_rss_mib"], 1),
        "wall_over_pydoc_seconds": round(on_file["wall_seconds"] - on_pydoc["wall_seconds"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, nargs="*", default=[0.3, 1.0])
    args = parser.parse_args()
    results = {}
    for gib in args.gib:
        with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
            results[f"{gib:g}gib"] = r = measure(gib, Path(tmp))
        print(
            f"{gib:g} GiB: {r['tokens']:,} tokens; tokenize {r['slimtune_tokenize_seconds']} s vs datasets.map "
            f"{r['datasets_map_seconds']} s ({r['speed_vs_datasets']}x); {r['cache_bytes_per_token']} B/token; "
            f"run over pydoc: +{r['rss_over_pydoc_mib']} MiB RSS, +{r['wall_over_pydoc_seconds']} s",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "data_scale.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    (out).write_text(json.dumps({**previous, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
