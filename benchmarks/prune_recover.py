"""Prune, then recover, on SmolLM2-135M: held-out perplexity of one-shot pruning and of recovery runs.

Held-out text: IDLE's NEWS.txt and README.txt from Python's standard library (English prose, never used for
calibration or training); calibration and recovery data: pydoc (data.source=pydoc). Perplexity is scored on
every non-overlapping 256-token window of the held-out text (`slimtune eval data.source=FILE`).

Phases (each result cached in --work, so a phase can be re-run alone with --phases):
  oneshot   dense; magnitude / wanda / sparsegpt at 50% and 2:4 (layer-sequential calibration, 32 x 256 tokens)
  recover   wanda 50% and sparsegpt 2:4 recovered with the `recover` recipe (CE + KD + SquareHead) vs CE only,
            at --steps steps x batch 2 x 256 tokens (the recipe's default budget), and at --long-steps where
            the default budget misses the target (50%: <= 1.25x dense, 2:4: <= 2x)
  select    wanda 2:4 recovered on data.select=degradation vs data.select=random (same number of blocks/tokens)
  cram      the dense model trained --cram-steps steps with optim.cram=true vs plain AdamW, each pruned one-shot
            (magnitude 50%, wanda 2:4), perplexity compared
Writes benchmarks/results/prune_recover.json and prints a table of perplexity and its ratio to dense.

    python benchmarks/prune_recover.py [--phases oneshot recover select cram] [--steps 60] [--long-steps 300]
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

from slimtune.config import load_config  # noqa: E402
from slimtune.trainer import run  # noqa: E402
from slimtune.trainer.evaluate import evaluate_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "prune_recover.json"


def heldout_text(work: Path) -> Path:
    import idlelib

    src = Path(idlelib.__file__).parent
    path = work / "heldout.txt"
    path.write_text("\n\n".join((src / f).read_text() for f in ("NEWS.txt", "README.txt")))
    return path


def compute_dtype() -> str:
    """bfloat16 where the CPU has native bf16 matmuls (AVX512-BF16 / AMX), else float32 (measure: bf16 is ~25x
    slower than fp32 without them)."""
    import torch

    a = torch.randn(1024, 1024)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        t0 = time.perf_counter()
        for _ in range(5):
            x @ x
        times[dtype] = time.perf_counter() - t0
    return "bfloat16" if times[torch.bfloat16] < times[torch.float32] else "float32"


class Bench:
    def __init__(self, a):
        self.a, self.work = a, Path(a.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.heldout = heldout_text(self.work)
        self.res = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not a.fresh else {}
        self.res.setdefault("rows", {})
        self.dtype = a.dtype or compute_dtype()

    def save(self):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(self.res, indent=1) + "\n")

    def ppl(self, model: str) -> float:
        cfg = load_config(
            None,
            [
                f"model.name={model}",
                f"data.source={self.heldout}",
                "train.seq_len=256",
                "train.batch_size=4",
                f"model.dtype={self.dtype}",
            ],
        )
        with contextlib.redirect_stdout(io.StringIO()):
            return evaluate_model(cfg, whole_text=True)["eval_perplexity"]

    def record(self, key: str, **row):
        row["ratio_to_dense"] = (
            row["perplexity"] / self.res["rows"]["dense"]["perplexity"] if "dense" in self.res["rows"] else 1.0
        )
        self.res["rows"][key] = row
        self.save()
        print(f"{key:44s} ppl {row['perplexity']:9.2f}  x{row['ratio_to_dense']:.3f} dense", flush=True)

    def pruned(self, model: str, method: str, pattern: str, tag: str) -> Path:
        from slimtune.model.commands import prune_command

        out = self.work / tag
        if not (out / "slimtune_sparse.json").is_file():
            cfg = load_config(
                None,
                [
                    f"model.name={model}",
                    f"prune.method={method}",
                    f"prune.pattern={pattern}",
                    "prune.sparsity=0.5",
                    "prune.calibration_samples=32",
                    "train.seq_len=256",
                    "data.source=pydoc",
                    f"output_dir={out}",
                    "overwrite=true",
                ],
            )
            t0 = time.perf_counter()
            prune_command(cfg)
            self.res.setdefault("prune_seconds", {})[tag] = time.perf_counter() - t0
        return out

    def recover(self, base: Path, tag: str, steps: int, extra: list[str]) -> dict:
        out = self.work / tag
        cfg = load_config(
            "recover",
            [
                f"model.name={base}",
                f"train.max_steps={steps}",
                f"model.dtype={self.dtype}",
                "logging.progress=false",
                "eval.max_batches=10",
                f"output_dir={out}",
                "overwrite=true",
                *extra,
            ],
        )
        t0 = time.perf_counter()
        report = run(cfg)
        return {
            "steps": steps,
            "tokens": steps * cfg.train.batch_size * cfg.train.seq_len,
            "seconds": time.perf_counter() - t0,
            "train_blocks": report["train_blocks"],
            "peak_rss_bytes": report["peak_memory_bytes"],
            "final": str(out / "final"),
            "overrides": extra,
        }

    # ------------------------------------------------------------------ phases

    def oneshot(self):
        self.record("dense", perplexity=self.ppl(self.a.model), model=self.a.model)
        for method in ("magnitude", "wanda", "sparsegpt"):
            for pattern in ("unstructured", "2:4"):
                tag = f"{method}_{'50' if pattern == 'unstructured' else '24'}"
                d = self.pruned(self.a.model, method, pattern, tag)
                self.record(f"oneshot {tag}", perplexity=self.ppl(str(d)), seconds=self.res["prune_seconds"].get(tag))

    def recover_phase(self):
        for tag in ("wanda_50", "sparsegpt_24"):
            method, pattern = tag.split("_")[0], "unstructured" if tag.endswith("50") else "2:4"
            base = self.pruned(self.a.model, method, pattern, tag)
            target = 1.25 if tag.endswith("50") else 2.0  # the targets (x dense perplexity)
            for loss, extra in (("ce", ["recover.kd=0", "recover.feature=0"]), ("ce+kd+squarehead", [])):
                info = self.recover(base, f"rec_{tag}_{loss}_{self.a.steps}", self.a.steps, extra)
                self.record(f"recovered {tag} {loss} {self.a.steps} steps", perplexity=self.ppl(info["final"]), **info)
            # the longer budget only where the recipe's default one misses the target
            if (
                self.a.long_steps > 0
                and self.res["rows"][f"recovered {tag} ce+kd+squarehead {self.a.steps} steps"]["ratio_to_dense"]
                > target
            ):
                info = self.recover(base, f"rec_{tag}_long", self.a.long_steps, [])
                self.record(
                    f"recovered {tag} ce+kd+squarehead {self.a.long_steps} steps",
                    perplexity=self.ppl(info["final"]),
                    **info,
                )

    def select_phase(self):
        base = self.pruned(self.a.model, "wanda", "2:4", "wanda_24")
        for select in ("random", "degradation"):
            info = self.recover(
                base, f"sel_{select}", self.a.steps, [f"data.select={select}", "data.select_fraction=0.1"]
            )
            self.record(
                f"recovered wanda_24 data.select={select} {self.a.steps} steps",
                perplexity=self.ppl(info["final"]),
                **info,
            )

    def cram_phase(self):
        for name, extra in (("plain", []), ("cram", ["optim.cram=true", "cram.rho=0.05"])):
            out = self.work / f"dense_{name}"
            cfg = load_config(
                "full",
                [
                    f"model.name={self.a.model}",
                    f"train.max_steps={self.a.cram_steps}",
                    "train.batch_size=2",
                    "train.seq_len=256",
                    "train.lr=2e-5",
                    f"model.dtype={self.dtype}",
                    "logging.progress=false",
                    "eval.max_batches=10",
                    f"output_dir={out}",
                    "overwrite=true",
                    *extra,
                ],
            )
            t0 = time.perf_counter()
            run(cfg)
            seconds = time.perf_counter() - t0
            self.record(
                f"trained {name} {self.a.cram_steps} steps (dense)",
                perplexity=self.ppl(str(out / "final")),
                seconds=seconds,
            )
            for method, pattern, tag in (("magnitude", "unstructured", "magnitude_50"), ("wanda", "2:4", "wanda_24")):
                d = self.pruned(str(out / "final"), method, pattern, f"{name}_{tag}")
                self.record(f"trained {name} then oneshot {tag}", perplexity=self.ppl(str(d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--phases", nargs="+", default=["oneshot", "recover", "select", "cram"])
    ap.add_argument("--steps", type=int, default=60, help="the short recovery budget (the recipe's default)")
    ap.add_argument("--long-steps", type=int, default=200, help="the longer budget (0: skip)")
    ap.add_argument("--cram-steps", type=int, default=40)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 where the CPU has native bf16)")
    ap.add_argument("--work", default="/tmp/slimtune-prune-bench")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in the JSON")
    a = ap.parse_args()
    b = Bench(a)
    from qlora_vs_peft import cpu_name  # benchmarks/ is on sys.path when a script here runs

    import torch

    b.res["device"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "dtype": b.dtype}
    b.res["heldout"] = "idlelib NEWS.txt + README.txt (Python stdlib), every 256-token window"
    for phase in a.phases:
        getattr(
            b, {"oneshot": "oneshot", "recover": "recover_phase", "select": "select_phase", "cram": "cram_phase"}[phase]
        )()
    print(json.dumps({k: round(v["ratio_to_dense"], 3) for k, v in b.res["rows"].items()}, indent=1))


if __name__ == "__main__":
    main()
