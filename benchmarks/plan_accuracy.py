"""How close `slimtune plan` comes to the measured peak memory.

For lora, qlora, full, galore, frugal and lq_lora on smollm2-135m and tiny-llama, with and without activation
checkpointing: the predicted peak (`slimtune plan ... --json`, a separate process) against report.json's
peak_memory_bytes (peak RSS on CPU) of `slimtune run` with the same overrides (a few steps, eval limited).
Then `slimtune plan full|lora --fit B` for budgets of 1.5, 2 and 3 GiB on smollm2: the recommended overrides
are run and their measured peak checked against the budget (a refusal, nothing predicted to fit, is recorded).
(lq_lora runs with fewer decomposition iterations and
Fisher samples than its recipe: LQ_FAST.)

  python benchmarks/plan_accuracy.py                      # everything (~30-60 min on a 2-core CPU)
  python benchmarks/plan_accuracy.py --only smollm2 lora  # the cases whose name has every word
  python benchmarks/plan_accuracy.py --calibrate          # the calibration runs (different batch / seq_len)

--calibrate runs a separate set of configurations (tiny-llama at train.seq_len=64, smollm2 at batch / seq_len
other than the reported 4 x 256) and prints the platform constants fitted on them (platform.py): the library
RSS from tiny-llama, the heap fragmentation factors by least squares on the smollm2 runs. The reported cases
are not used for fitting. Writes benchmarks/results/plan_accuracy.json (the calibration under "calibration").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path.pop(0)  # keep benchmarks/ off the path: a module here could shadow a package transformers imports
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ("lora", "qlora", "full", "galore", "frugal", "lq_lora")
MODELS = ("smollm2-135m", "tiny-llama")
BUDGETS_GIB = (1.5, 2.0, 3.0)
FIT_RECIPES = ("full", "lora")
RUN = ["train.max_steps=3", "eval.max_batches=2", "checkpoint.every=0", "logging.progress=false"]
TARGET = 0.15  # every prediction within 15% of the measured peak
# LQ-LoRA's decomposition takes ~30 min on SmolLM2 at the recipe's 10 alternations x 16 Fisher samples on a
# 2-core CPU; fewer alternations and samples change its time, not its memory (one sample's gradients at a time)
LQ_FAST = ["lq_lora.max_iters=1", "lq_lora.score_iters=1", "lq_lora.calibration_samples=4"]
NOTES = [
    "The first full run (planner frozen before it) predicted smollm2-135m lq_lora ac=true at 0.826 of its measured "
    "peak (1568 vs 1899 MiB): the decomposition phase left out the Fisher pass's calibration sample (its saved "
    "activations, loss chunks and heap churn). That term was added after seeing the miss, its slope checked on a "
    "profiled seq_len=128 run; the lq_lora rows were then re-run, and the seq_len=512 row is the held-out check "
    "of the revision (not used to make it). Every other row is from the frozen planner.",
]


def cases() -> list[tuple[str, str, list[str]]]:
    out = []
    for model in MODELS:
        for recipe in RECIPES:
            for ac in ("false", "true"):
                name = f"{model} {recipe} ac={ac}"
                extra = LQ_FAST if recipe == "lq_lora" else []
                out.append((name, recipe, [f"model.name={model}", f"train.activation_checkpointing={ac}", *extra]))
    # a held-out check of the decomposition phase (see NOTES): its Fisher pass's activations grow with seq_len
    out.append(
        (
            "smollm2-135m lq_lora ac=true s512",
            "lq_lora",
            ["model.name=smollm2-135m", "train.seq_len=512", "train.activation_checkpointing=true", *LQ_FAST],
        )
    )
    return out


def calibration_cases() -> list[tuple[str, str, list[str]]]:
    """Configurations used to fit platform.py's constants, none of them a reported case."""
    tiny = ["model.name=tiny-llama", "train.seq_len=64"]
    smol = ["model.name=smollm2-135m"]
    return [
        ("cal tiny lora s64", "lora", tiny),
        ("cal tiny full s64", "full", tiny + ["train.activation_checkpointing=false"]),
        ("cal tiny qlora s64", "qlora", tiny),
        ("cal smollm2 lora b2 s512", "lora", smol + ["train.batch_size=2", "train.seq_len=512"]),
        (
            "cal smollm2 lora b8 s128 ac",
            "lora",
            smol + ["train.batch_size=8", "train.seq_len=128", "train.activation_checkpointing=true"],
        ),
        ("cal smollm2 qlora b2 s128", "qlora", smol + ["train.batch_size=2", "train.seq_len=128"]),
        # added when the planner over-predicted qlora ac=true by 15.0% (no quantized + checkpointed run was here)
        (
            "cal smollm2 qlora b8 s128 ac",
            "qlora",
            smol + ["train.batch_size=8", "train.seq_len=128", "train.activation_checkpointing=true"],
        ),
        ("cal smollm2 full b2 s128 ac", "full", smol + ["train.batch_size=2", "train.seq_len=128"]),
        (
            "cal smollm2 full b1 s512",
            "full",
            smol + ["train.batch_size=1", "train.seq_len=512", "train.activation_checkpointing=false"],
        ),
        ("cal smollm2 galore b2 s512 ac", "galore", smol + ["train.batch_size=2", "train.seq_len=512"]),
        # the offload engine (no fragmentation term: it fixes glibc's mmap threshold), checked, not fitted
        (
            "cal smollm2 full offload-opt b2 s128",
            "full",
            smol + ["train.batch_size=2", "train.seq_len=128", "engine.name=offload", "engine.params=none"],
        ),
        (
            "cal smollm2 full offload-all b2 s128",
            "full",
            smol + ["train.batch_size=2", "train.seq_len=128", "engine.name=offload"],
        ),
    ]


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def predict(recipe: str, overrides: list[str], extra: list[str] = ()) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "slimtune", "plan", recipe, *overrides, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    if r.returncode:
        raise RuntimeError(f"plan {recipe} {overrides}: {r.stderr.strip()[-2000:]}")
    return r.stdout, time.perf_counter() - t0


def measure(recipe: str, overrides: list[str], out_dir: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "slimtune", "run", recipe, *overrides, *RUN, f"output_dir={out_dir}", "overwrite=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    if r.returncode:
        raise RuntimeError(f"run {recipe} {overrides}: {r.stderr.strip()[-3000:]}")
    report = json.loads((out_dir / "report.json").read_text())
    return {
        "measured": report["peak_memory_bytes"],
        "planned_in_report": report.get("planned_peak_memory_bytes"),
        "kind": report["peak_memory_kind"],
        "dtype": report["config"]["model"]["dtype"],
        "run_seconds": round(time.perf_counter() - t0, 1),
    }


def one(name: str, recipe: str, overrides: list[str], tmp: Path) -> dict:
    out, plan_seconds = predict(recipe, overrides + RUN, ["--json"])
    plan = json.loads(out)
    row = {
        "case": name,
        "recipe": recipe,
        "overrides": overrides,
        "predicted": plan["peak_memory_bytes"],
        "peak_phase": plan["peak_phase"],
        "breakdown": plan["breakdown"],
        "plan_seconds": round(plan_seconds, 2),
    }
    row.update(measure(recipe, overrides, tmp / name.replace(" ", "_")))
    row["ratio"] = row["predicted"] / row["measured"]
    return row


def fit_case(recipe: str, budget_gib: float, tmp: Path) -> dict:
    """`slimtune plan RECIPE --fit B` on smollm2; the recommended overrides run and checked against B. A refusal
    (nothing predicted to fit, exit 2) is recorded with its message."""
    budget = int(budget_gib * 2**30)
    base = ["model.name=smollm2-135m"]
    row = {"case": f"smollm2 {recipe} --fit {budget_gib}GiB", "recipe": recipe, "budget": budget}
    r = subprocess.run(
        [sys.executable, "-m", "slimtune", "plan", recipe, *base, *RUN, "--fit", f"{budget_gib}GiB"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    if r.returncode == 2:
        row.update(fits=False, message=r.stderr.strip())
        return row
    if r.returncode:
        raise RuntimeError(f"plan --fit: {r.stderr.strip()[-2000:]}")
    tokens = r.stdout.strip().splitlines()[-1].split()
    plan = json.loads(predict(recipe, base + RUN + tokens, ["--json"])[0])
    row.update(fits=True, overrides=tokens, predicted=plan["peak_memory_bytes"], peak_phase=plan["peak_phase"])
    row.update(measure(recipe, base + tokens, tmp / f"fit_{recipe}_{budget_gib}"))
    row["ratio"] = row["predicted"] / row["measured"]
    row["under_budget"] = row["measured"] < budget
    return row


def _mib(n) -> str:
    return f"{n / 2**20:8.0f}"


def table(rows: list[dict]) -> str:
    lines = [f"{'case':<34}{'predicted MiB':>14}{'measured MiB':>14}{'ratio':>8}  phase / note"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<34}{'-':>14}{'-':>14}{'-':>8}  failed: {r['error'][-200:]}")
            continue
        if r.get("fits") is False:
            lines.append(f"{r['case']:<34}{'-':>14}{'-':>14}{'-':>8}  {r['message']}")
            continue
        note = r.get("peak_phase", "")
        if "budget" in r:
            note = f"{'under' if r['under_budget'] else 'OVER'} the budget with: " + " ".join(r["overrides"])
        lines.append(f"{r['case']:<34}{_mib(r['predicted']):>14}{_mib(r['measured']):>14}{r['ratio']:>8.3f}  {note}")
    return "\n".join(lines)


def fit_constants(rows: list[dict]) -> dict:
    """LIBRARY_RSS from the tiny-llama runs (measured minus everything else predicted); the fragmentation factors
    (per the runs' model.dtype) by least squares of measured minus the predicted live bytes on the SmolLM2 runs
    (the offload engine's runs, which fix glibc's mmap threshold, are left out)."""
    import numpy as np

    from slimtune.plan import platform as P

    terms = [_terms(r) for r in rows]
    tiny = [t for r, t in zip(rows, terms) if "tiny" in r["case"]]
    lib = [t["measured"] - (t["total"] - t["libraries"] - t["frag"]) for t in tiny]
    out = {
        "LIBRARY_RSS_MiB": float(np.mean(lib)) / 2**20,
        "library_samples_MiB": [x / 2**20 for x in lib],
        "current": {"LIBRARY_RSS_MiB": P.LIBRARY_RSS / 2**20, "FRAGMENTATION": P.FRAGMENTATION},
    }
    smol = [t for r, t in zip(rows, terms) if "smollm2" in r["case"] and "offload" not in r["case"]]
    for dtype in sorted({t["dtype"] for t in smol}):
        sel = [t for t in smol if t["dtype"] == dtype]
        a = np.array([[t["churn_heap"], t["dequant_heap"]] for t in sel], dtype=float)
        b = np.array([t["measured"] - (t["total"] - t["frag"]) for t in sel], dtype=float)
        coef = np.linalg.lstsq(a, b, rcond=None)[0]
        out[f"FRAGMENTATION[{dtype}]"] = [round(float(c), 3) for c in coef]
        predicted = np.array([t["total"] - t["frag"] for t in sel]) + a @ coef
        out[f"fit_ratios[{dtype}]"] = [round(float(p / t["measured"]), 3) for p, t in zip(predicted, sel)]
    return out


def _terms(r: dict) -> dict:
    """The prediction's parts for a measured row: total, libraries, fragmentation and its two inputs."""
    from slimtune import config as C
    from slimtune.plan import platform as P
    from slimtune.plan.activations import activations
    from slimtune.plan.arch import architecture
    from slimtune.plan.estimate import DTYPE_BYTES, _weights, plan_memory, resolve_dtype

    cfg = resolve_dtype(C.load_config(r["recipe"], r["overrides"] + RUN), "cpu")
    plan = plan_memory(cfg)
    arch = architecture(cfg.model.name)
    w = _weights(arch, cfg)
    a = DTYPE_BYTES[cfg.model.dtype]
    dequant = sum(lin.numel * a for lin in arch.linears if lin.name in w.quantized and lin.numel * a < P.MMAP_MAX)
    return {
        "measured": r["measured"],
        "total": plan.peak_memory_bytes,
        "libraries": plan.breakdown["libraries"],
        "frag": plan.breakdown.get("allocator.fragmentation", 0),
        "dtype": cfg.model.dtype,
        "churn_heap": activations(arch, cfg, w, "cpu").churn_heap,
        "dequant_heap": dequant,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="run the cases whose name contains every word")
    ap.add_argument("--calibrate", action="store_true", help="run the calibration set and fit the constants")
    ap.add_argument("--no-fit", action="store_true", help="skip the --fit budget runs")
    ap.add_argument("--fit-only", action="store_true", help="only the --fit budget runs (kept beside stored rows)")
    ap.add_argument("--refit", action="store_true", help="fit the constants again on the stored calibration rows")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "plan_accuracy.json"  # the calibration under its "calibration" key, the rest beside it
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if args.refit:
        print(json.dumps(fit_constants(previous["calibration"]["rows"]), indent=1))
        return 0
    todo = [] if args.fit_only else calibration_cases() if args.calibrate else cases()
    todo = [c for c in todo if all(w in c[0] for w in args.only)]
    names = {c[0] for c in todo}
    if args.fit_only:  # the stored accuracy rows stay, the --fit rows are redone
        kept = [r for r in previous.get("rows", []) if "budget" not in r]
    elif args.only and not args.calibrate:  # the re-run cases replace their stored rows
        kept = [r for r in previous.get("rows", []) if r["case"] not in names]
    else:
        kept = []
    rows: list[dict] = []

    def save() -> dict:
        result = summary(kept + rows)
        if args.calibrate:
            result = {**previous, "calibration": result}
        elif "calibration" in previous:
            result["calibration"] = previous["calibration"]
        path.write_text(json.dumps(result, indent=1) + "\n")  # after every case: a crash loses nothing
        return result

    with tempfile.TemporaryDirectory(prefix="plan_accuracy_") as tmp:
        jobs = [
            (name, lambda r=recipe, o=overrides, n=name: one(n, r, o, Path(tmp))) for name, recipe, overrides in todo
        ]
        if not args.calibrate and not args.no_fit and not args.only:
            jobs += [
                (f"smollm2 {r} --fit {b}GiB", lambda r=r, b=b: fit_case(r, b, Path(tmp)))
                for r in FIT_RECIPES
                for b in BUDGETS_GIB
            ]
        for name, job in jobs:
            print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
            try:
                rows.append(job())
            except Exception as e:  # noqa: BLE001  (record the failure, go on with the other cases)
                rows.append({"case": name, "error": str(e)})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            save()
    result = save()
    print(table(result["calibration"]["rows"] if args.calibrate else result["rows"]))
    if "within_target" in result:
        print(
            f"\n{result['within_target']}/{result['cases']} predictions within {TARGET:.0%} of the measured peak; "
            f"worst {result['worst']['case']} ({result['worst']['ratio']:.3f})"
        )
    if args.calibrate:
        result["calibration"]["fitted"] = fit_constants([r for r in rows if "error" not in r])
        print(json.dumps(result["calibration"]["fitted"], indent=1))
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def summary(rows: list[dict]) -> dict:
    order = [c[0] for c in calibration_cases() + cases()]
    rows = sorted(rows, key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
    result = {"machine": _machine(), "target": TARGET, "notes": NOTES, "rows": rows}
    accuracy = [r for r in rows if "budget" not in r and "ratio" in r]
    if accuracy:
        worst = max(accuracy, key=lambda r: abs(r["ratio"] - 1))
        result["within_target"] = sum(abs(r["ratio"] - 1) <= TARGET for r in accuracy)
        result["cases"] = len(accuracy)
        result["worst"] = {"case": worst["case"], "ratio": worst["ratio"]}
    return result


def _machine() -> dict:
    import platform

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    sys.exit(main())
