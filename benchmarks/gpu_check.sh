#!/usr/bin/env bash
# Everything that needs CUDA, in one go (< 5 min on one H100), summarized in one JSON:
#   * tests/kernels, compiled Triton (no TRITON_INTERPRET), slow ones included: fp8 / mxfp4 / nf4 matmul,
#     Hadamard, linear cross-entropy, DFloat11 decode, trainer wiring, fp8 vs torch._scaled_mm (marked gpu);
#   * the other tests marked gpu (offload's DeviceMirror: pinned slabs, copy stream, events);
#   * engines on one GPU: engine.name=ddp and fsdp2 in one process on CUDA, same loss curve (NCCL takes one
#     GPU per rank, so the 2-process tests, tests/trainer/test_ddp.py and tests/engines/test_fsdp2.py, run
#     here on NCCL only with >= 2 GPUs; on one GPU they are listed as not run);
#   * benchmarks/triton_kernels.py --tokens 4096 (errors, TFLOP/s, loss memory), alone on the GPU.
#
#   bash benchmarks/gpu_check.sh [OUT.json]     # default benchmarks/results/gpu_check.json
#
# Logs and JUnit XML go to OUT's name without .json plus _logs/. Needs torch with CUDA, triton, transformers,
# peft, safetensors, xxhash, scipy and pytest; slimtune is installed with --no-deps (and put on PYTHONPATH
# in case that fails). Without CUDA it prints one line and exits 0. Exit 1 when a test or a step failed or
# ran past its timeout.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-$ROOT/benchmarks/results/gpu_check.json}
PY=${PYTHON:-$(command -v python || command -v python3)}

if [ -z "$PY" ] || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False or torch is missing): nothing to check"
    exit 0
fi

START=$(date +%s.%N)
LOGS=${OUT%.json}_logs
mkdir -p "$LOGS" "$(dirname "$OUT")"
rm -rf "${LOGS:?}"/*
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # slimtune importable even if the install fails
SCRATCH=$(mktemp -d)  # each pytest's own --basetemp (parallel runs would prune each other's numbered dirs)
trap 'rm -rf "$SCRATCH"' EXIT

step() {  # step NAME SECONDS CMD...: CMD under a timeout; output in NAME.log, "rc seconds limit" in NAME.rc
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s.%N)
    timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    echo "$rc $(awk "BEGIN {print $(date +%s.%N) - $t0}") $limit" >"$LOGS/$name.rc"
}

pt() {  # pt NAME SECONDS PYTEST-ARGS...: one pytest process with its JUnit XML
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$LOGS/$name.xml" \
        --basetemp="$SCRATCH/$name" "$@"
}

step install 25 "$PY" -m pip install --no-deps --no-build-isolation -e . -q
# the built-in tiny model, materialised once before the parallel runs read it
step prepare 25 "$PY" -c "from slimtune.formats.hf import resolve_model_dir; print(resolve_model_dir('tiny-llama'))"

# tests in parallel (16 cores compile the Triton kernels); one pytest per kernel test file
for f in tests/kernels/test_*.py; do
    name=$(basename "$f" .py)
    pt "kernels.${name#test_}" 150 "$f" -m "slow or not slow" &
done
pt gpu_marked 150 tests -m gpu --ignore=tests/kernels --continue-on-collection-errors &
N_GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$N_GPUS" -ge 2 ]; then
    pt engines_nccl 150 tests/trainer/test_ddp.py tests/engines/test_fsdp2.py -m "slow or not slow" &
fi
cat >"$LOGS/engines_1gpu.py" <<'EOF'
"""engine.name=ddp and engine.name=fsdp2 (its one-rank group) in one process on CUDA: the same loss curve
within 1e-4 (the tolerance of tests/engines), both on cuda."""
import json
import subprocess
import sys
from pathlib import Path

work, report = Path(sys.argv[1]), Path(sys.argv[2])  # run dirs (scratch), the JSON
RUN = ["model.name=tiny-llama", "model.dtype=float32", "train.seq_len=64", "train.batch_size=2", "train.max_steps=6",
       "train.lr=3e-3", "train.warmup_steps=1", "eval.max_batches=3", "logging.progress=false"]
out = {}
for engine in ("ddp", "fsdp2"):
    d = work / engine
    r = subprocess.run([sys.executable, "-m", "slimtune", "run", "full", *RUN, f"engine.name={engine}",
                        f"output_dir={d}", "overwrite=true"], capture_output=True, text=True)
    row = {"returncode": r.returncode}
    if (d / "metrics.jsonl").is_file():
        row["losses"] = [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    if (d / "report.json").is_file():
        run = json.loads((d / "report.json").read_text())
        row.update(device=run["device"], peak_memory_bytes=run["peak_memory_bytes"],
                   tokens_per_second=run["tokens_per_second"])
    if r.returncode:
        row["stderr_tail"] = r.stderr[-1500:]
    out[engine] = row
a, b = out["ddp"].get("losses") or [], out["fsdp2"].get("losses") or []
out["passed"] = (all(out[e]["returncode"] == 0 and out[e].get("device", "").startswith("cuda") for e in ("ddp", "fsdp2"))
                 and len(a) == len(b) == 6 and all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(b, a)))
report.write_text(json.dumps(out, indent=2))
print(json.dumps(out, indent=2))
sys.exit(0 if out["passed"] else 1)
EOF
step engines_1gpu 150 "$PY" "$LOGS/engines_1gpu.py" "$SCRATCH/engines" "$LOGS/engines_1gpu.json" &
wait

# the kernel benchmark alone on the GPU (its timings)
step kernel_bench 80 "$PY" benchmarks/triton_kernels.py --tokens 4096 --out "$LOGS/kernels.json"

"$PY" - "$LOGS" "$OUT" "$START" "$N_GPUS" <<'EOF'
import importlib
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

logs, out, start, n_gpus = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])


def step(name):
    rc, seconds, limit = (logs / f"{name}.rc").read_text().split()
    rc = int(rc)
    return {"rc": rc, "seconds": round(float(seconds), 1), "limit_s": int(limit), "timed_out": rc in (124, 137)}


def pytest_group(name):
    row = step(name)
    xml = logs / f"{name}.xml"
    if not xml.is_file():  # killed before pytest wrote it
        return {**row, "passed": None, "failed": None, "errors": None, "skipped": None}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skips = [], {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            failed.append(test_id)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")[:160]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**row, **counts, "failed_tests": failed, "skip_reasons": skips}


groups = {}
for rc_file in sorted(logs.glob("*.rc")):
    name = rc_file.stem
    if (logs / f"{name}.xml").is_file() or name.startswith("kernels.") or name in ("gpu_marked", "engines_nccl"):
        groups[name] = pytest_group(name)
kernels = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "incomplete": []}  # all kernel test files
for name, g in groups.items():
    if name.startswith("kernels."):
        if g["passed"] is None or g["timed_out"]:
            kernels["incomplete"].append(name)  # counts below leave out what it did not report
        for k in ("passed", "failed", "errors", "skipped"):
            kernels[k] += g[k] or 0
engines = step("engines_1gpu")
report = logs / "engines_1gpu.json"
engines.update(json.loads(report.read_text()) if report.is_file() else {"passed": False})
bench = step("kernel_bench")
if (logs / "kernels.json").is_file():
    bench.update(json.loads((logs / "kernels.json").read_text()))


def version(module):
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        return f"missing ({type(e).__name__})"


import torch  # noqa: E402

try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
except (OSError, subprocess.SubprocessError):
    driver = None
core = ["transformers", "safetensors", "tokenizers", "yaml", "tqdm", "matplotlib", "numpy", "scipy", "xxhash"]
result = {
    "gpu": torch.cuda.get_device_name(0),
    "gpu_count": n_gpus,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
    "driver": driver,
    "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 **{m: version(m) for m in ("triton", "transformers", "peft", "safetensors", "scipy")}},
    # pyproject's dependencies that do not import here (a run writes loss.png with matplotlib)
    "missing_dependencies": [m for m in core if version(m).startswith("missing")],
    "install": step("install"),
    "prepare": step("prepare"),
    "tests": {"kernels": kernels, **groups},
    "engines_1gpu": engines,
    "engines_nccl_2proc": groups.get("engines_nccl", {"not_run": f"{n_gpus} GPU(s): NCCL takes one GPU per rank, "
                                                                  "tests/trainer/test_ddp.py and tests/engines need 2"}),
    "kernel_bench": bench,
    "wall_seconds": round(time.time() - start, 1),
}
bad = [n for n, g in groups.items() if g["failed"] or g["errors"] or g["timed_out"] or g["passed"] is None]
bad += [n for n, s in (("prepare", step("prepare")), ("engines_1gpu", engines), ("kernel_bench", bench))
        if s["rc"] or s.get("passed") is False]
result["ok"], result["problems"] = not bad, bad
out.write_text(json.dumps(result, indent=2) + "\n")
t = result["tests"]
print(f"gpu_check: {result['gpu']}, torch {torch.__version__}, triton {result['versions']['triton']}: "
      + ", ".join(f"{n} {g['passed']} passed / {g['failed']} failed / {g['errors']} errors / {g['skipped']} skipped"
                  for n, g in [("kernels", t["kernels"])] + [(n, g) for n, g in t.items() if not n.startswith("kernel")])
      + f"; engines_1gpu {'ok' if engines.get('passed') else 'FAILED'}; kernel_bench rc {bench['rc']}; "
      + f"{result['wall_seconds']} s; problems: {bad or 'none'}; wrote {out}")
sys.exit(0 if not bad else 1)
EOF
