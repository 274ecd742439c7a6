"""Compressed checkpoints on SmolLM2-135M: bytes on disk, load time and held-out perplexity.

bf16 safetensors (the reference), dfloat11 (lossless), and a 50%-sparse (Wanda) and a 2:4 (SparseGPT) model
each in `sparse`, `sparse-nf4` and `sparse-nf4 --rank 16` (LQ-LoRA factors beside the values). Bytes are the whole
exported dir without tokenizer files; bits per
parameter are also given over the pruned matrices alone (their mask/pattern + values entries, + factors). Held-out
text: IDLE's NEWS.txt + README.txt (as benchmarks/prune_recover.py). Writes
benchmarks/results/compressed_checkpoints.json.

    python benchmarks/compressed_checkpoints.py [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimtune.formats.compressed import MANIFEST, TENSORS  # noqa: E402
from slimtune.formats.compressed_io import dir_bytes, export_compressed  # noqa: E402
from slimtune.config import load_config  # noqa: E402
from slimtune.trainer.evaluate import evaluate_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compressed_checkpoints.json"


def ppl(model: str, heldout: Path) -> float:
    cfg = load_config(
        None,
        [
            f"model.name={model}",
            f"data.source={heldout}",
            "train.seq_len=256",
            "train.batch_size=4",
            "model.dtype=bfloat16",
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate_model(cfg, whole_text=True)["eval_perplexity"]


def load_seconds(model: str) -> float:
    from slimtune.model.load import load_base

    t0 = time.perf_counter()
    load_base(model, "bfloat16")
    return time.perf_counter() - t0


def pruned_bits(out: Path) -> float | None:
    """Bits per parameter over the pruned matrices: their stored entries / their weights."""
    from safetensors import safe_open

    manifest = json.loads((out / MANIFEST).read_text())
    pruned = {n: r for n, r in manifest["tensors"].items() if r.get("kind") in ("mask", "nm")}
    if not pruned:
        return None
    nbytes = 0
    with safe_open(str(out / TENSORS), "pt") as f:
        for key in f.keys():
            if key.split("::")[0] in pruned:
                t = f.get_tensor(key)
                nbytes += t.numel() * t.element_size()
    params = sum(r["shape"][0] * r["shape"][1] for r in pruned.values())
    factors = out / "adapter" / "adapter_model.safetensors"
    if factors.is_file():  # --rank: the factors belong to the pruned matrices
        nbytes += factors.stat().st_size
    return 8 * nbytes / params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/slimtune-compressed-bench")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import idlelib

    heldout = work / "heldout.txt"
    heldout.write_text("\n\n".join((Path(idlelib.__file__).parent / f).read_text() for f in ("NEWS.txt", "README.txt")))
    from slimtune.model.commands import prune_command
    from slimtune.formats.hf import resolve_model_dir

    dense = resolve_model_dir("smollm2-135m")
    for tag, method, pattern in (("w50", "wanda", "unstructured"), ("sg24", "sparsegpt", "2:4")):
        if not (work / tag / "slimtune_sparse.json").is_file():
            with contextlib.redirect_stdout(io.StringIO()):
                prune_command(
                    load_config(
                        None,
                        [
                            "model.name=smollm2-135m",
                            "model.dtype=bfloat16",
                            f"prune.method={method}",
                            f"prune.pattern={pattern}",
                            f"output_dir={work / tag}",
                            "overwrite=true",
                        ],
                    )
                )
    rows = {}

    def record(key, model: Path, ref_bytes: int, bits=None):
        rows[key] = {
            "bytes": dir_bytes(model),
            "ratio_to_bf16": dir_bytes(model) / ref_bytes,
            "load_seconds": load_seconds(str(model)),
            "perplexity": ppl(str(model), heldout),
        }
        if bits is not None:
            rows[key]["pruned_matrices_bits_per_param"] = bits
        print(
            f"{key:28s} {rows[key]['bytes'] / 2**20:8.1f} MiB  x{rows[key]['ratio_to_bf16']:.3f}  load "
            f"{rows[key]['load_seconds']:.2f}s  ppl {rows[key]['perplexity']:.3f}"
            + (f"  pruned {bits:.3f} bits/param" if bits else ""),
            flush=True,
        )

    ref = dir_bytes(dense)
    record("bf16 safetensors", dense, ref)
    jobs = [
        ("dfloat11", "smollm2-135m", dense, "dfloat11"),
        ("w50 bf16 safetensors", None, work / "w50", None),
        ("w50 sparse", str(work / "w50"), None, "sparse"),
        ("w50 sparse-nf4", str(work / "w50"), None, "sparse-nf4"),
        ("sg24 bf16 safetensors", None, work / "sg24", None),
        ("sg24 sparse", str(work / "sg24"), None, "sparse"),
        ("sg24 sparse-nf4", str(work / "sg24"), None, "sparse-nf4"),
        ("w50 sparse-nf4 rank16", str(work / "w50"), None, "sparse-nf4"),
        ("sg24 sparse-nf4 rank16", str(work / "sg24"), None, "sparse-nf4"),
    ]
    for key, src, path, fmt in jobs:
        if fmt is None:
            record(key, path, ref)
            continue
        out = work / key.replace(" ", "_")
        if not (out / MANIFEST).is_file():
            export_compressed(src, fmt, str(out), rank=16 if key.endswith("rank16") else 0)
        record(key, out, ref, pruned_bits(out))
    from qlora_vs_peft import cpu_name  # benchmarks/ is on sys.path when a script here runs

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": {"cpu": cpu_name()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
