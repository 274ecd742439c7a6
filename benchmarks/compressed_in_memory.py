"""model.keep_compressed=true on SmolLM2-135M: peak RSS and time of `slimtune eval` with the decoder layers
kept encoded in memory vs decoded at load, for a dfloat11 export and a 50%-sparse (Wanda) sparse-nf4 export.

Each eval runs in a fresh process (its peak RSS: its VmHWM) on the same held-out text (the first 16 KiB of
IDLE's NEWS.txt, 256-token windows, batch 4), model.dtype=float32 as eval's default. Perplexities must be
identical. Writes benchmarks/results/compressed_in_memory.json.

    python benchmarks/compressed_in_memory.py [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimtune.formats.compressed import MANIFEST  # noqa: E402
from slimtune.formats.compressed_io import export_compressed  # noqa: E402
from slimtune.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compressed_in_memory.json"


# the child reports its own VmHWM: the mark of its address space since exec (ru_maxrss from wait4 would
# count the pages a fork shares with this process before the exec)
CHILD = (
    "import sys; from slimtune.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('VMHWM', int(hwm) * 1024, file=sys.stderr); sys.exit(rc)"
)


def eval_run(model: Path, text: Path, keep: bool) -> dict:
    """One `slimtune eval` in a fresh process: its JSON line, wall seconds and peak RSS (VmHWM)."""
    args = [
        sys.executable,
        "-c",
        CHILD,
        "eval",
        f"model.name={model}",
        f"data.source={text}",
        "train.seq_len=256",
        "train.batch_size=4",
        f"model.keep_compressed={str(keep).lower()}",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    peak = int(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("VMHWM")))
    return {"peak_rss_bytes": peak, "seconds": seconds, **json.loads(r.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/slimtune-compressed-memory-bench")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import idlelib

    text = work / "heldout.txt"
    text.write_text((Path(idlelib.__file__).parent / "NEWS.txt").read_text()[: 16 * 1024])
    if not (work / "w50" / "slimtune_sparse.json").is_file():
        from slimtune.model.commands import prune_command

        with contextlib.redirect_stdout(io.StringIO()):
            prune_command(
                load_config(
                    None,
                    [
                        "model.name=smollm2-135m",
                        "model.dtype=bfloat16",
                        "prune.method=wanda",
                        f"output_dir={work / 'w50'}",
                        "overwrite=true",
                    ],
                )
            )
    rows = {}
    for key, src, fmt in (
        ("dfloat11", "smollm2-135m", "dfloat11"),
        ("w50 sparse-nf4", str(work / "w50"), "sparse-nf4"),
    ):
        out = work / key.replace(" ", "_")
        if not (out / MANIFEST).is_file():
            with contextlib.redirect_stdout(io.StringIO()):
                export_compressed(src, fmt, str(out))
        for keep in (False, True):
            r = eval_run(out, text, keep)
            rows[f"{key} keep_compressed={keep}"] = r
            print(
                f"{key:16s} keep_compressed={keep!s:5s}  peak {r['peak_rss_bytes'] / 2**20:7.0f} MiB  "
                f"{r['seconds']:6.1f} s  ppl {r['eval_perplexity']:.4f}  ({r['eval_tokens']} tokens)",
                flush=True,
            )
    from qlora_vs_peft import cpu_name  # benchmarks/ is on sys.path when a script here runs

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": {"cpu": cpu_name()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
