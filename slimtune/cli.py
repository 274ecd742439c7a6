"""`slimtune run|eval|export|recipes|config show`: parse arguments, build the config, call the trainer.

Bad input (SlimtuneError) prints one line on stderr and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from slimtune.errors import SlimtuneError

USAGE = """slimtune run RECIPE [key=value ...]     train (RECIPE: a name from `slimtune recipes` or a .yaml path)
       slimtune eval [RECIPE] [key=value ...]  perplexity of model.name (HF dir, built-in, quantized or adapter
                 dir) on all of data.source when given (eval.split=true: its eval split), else on the eval split
       slimtune generate [RECIPE] model.name=M prompt="..." [messages=F.json max_new_tokens=128 temperature=0
                 top_p=1.0 seed=0]  the continuation only on stdout (greedy at temperature=0; M as for eval,
                 or a run dir); computes in fp32 unless model.dtype is given
       slimtune quantize [RECIPE] key=value ...  write a quantized checkpoint to output_dir, e.g.
                 model.name=M quant.method=lq_lora lq_lora.budget_bits=3.0 lora.rank=16 output_dir=DIR
       slimtune prune [RECIPE] key=value ...  prune model.name (prune.method=magnitude|wanda|sparsegpt,
                 prune.sparsity / prune.pattern=2:4, calibrated on data.source) into output_dir
       slimtune export RUN_DIR [--merge] [--onto full|quantized] [--out DIR]  a run's model as an HF dir (its
                 adapter merged: --format hf always merges)
       slimtune export RUN_OR_MODEL --format dfloat11|sparse|sparse-nf4|sparse-int8 [--rank R] [--merge] [--out DIR]
                 compressed checkpoint (lossless bf16, or a pruned model's masks + kept values, with --rank R
                 low-rank factors beside quantized values); eval and run load it. A run's adapter is merged
                 first, but sparse-nf4 / sparse-int8 keep it beside the quantized values unless --merge
       slimtune export SRC --format gguf [--gguf-type f16|q8_0|q4_0|q4_k|q6_k|...] [--out F.gguf]  one GGUF
                 file for llama.cpp / Ollama (a QAT run's codes written as trained); --format gguf-lora: a LoRA
                 run's adapter as a llama.cpp LoRA GGUF for that base; --format compressed-tensors: a quantized
                 model (int-k / int8 / q4_0 codes as stored, 2:4 sparsity noted) for vLLM / transformers
       slimtune plan RECIPE [key=value ...] [--json] [--fit BUDGET] [--disk BUDGET] [--nproc N]  predicted peak
                 memory of the run (breakdown by component, from config.json alone) and the disk it writes;
                 --fit 24GiB prints the overrides that fit (--disk 60GB: within that disk too)
       slimtune data prepare RECIPE [key=value ...]  tokenize data.source once into the data cache (before a
                 torchrun launch, so its ranks find it built); prints the entry's path, tokens and blocks
       slimtune recipes                        list recipes
       slimtune config show RECIPE [key=value ...]  print the resolved config"""


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _load(C, recipe, overrides):
    """eval / generate / quantize / prune: model.dtype=auto on the command line resolves per the hardware
    (hardware.py); from a recipe or by default it leaves the command's fp32."""
    cfg = C.load_config(recipe, overrides)
    given = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "model.dtype"]
    if given:
        from slimtune.hardware import resolve_dtype

        cfg, choice = resolve_dtype(cfg)
        if given[-1] == "auto":  # say what auto chose; an explicit dtype needs no notice
            print(f"slimtune: compute dtype {choice['dtype']} ({choice['reason']})", file=sys.stderr)
    return cfg


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def _export_compressed(args, export_compressed) -> None:
    """`export SRC --format F`: a run dir's final model (its adapter merged first, into a temporary dir next
    to the output), a model dir or a built-in name."""
    import shutil
    import tempfile
    from pathlib import Path

    src = Path(args.run_dir).expanduser()
    if not ((src / "config.yaml").is_file() and (src / "final").is_dir()):
        export_compressed(args.run_dir, args.format, args.out, rank=args.rank)
        return
    final = src / "final"
    if (final / "config.json").is_file():  # full fine-tuning: final/ is the model
        export_compressed(args.run_dir, args.format, args.out, model_dir=final, rank=args.rank)
        return
    if args.format in ("sparse-nf4", "sparse-int8") and (final / "adapter_config.json").is_file() and not args.merge:
        # quantized kept values: the adapter stays beside them in full precision rather than merged and rounded
        from slimtune.config import load_config

        base = load_config(str(src / "config.yaml")).model.name
        export_compressed(args.run_dir, args.format, args.out, model_dir=Path(base), adapter_dir=final, rank=args.rank)
        return
    from slimtune.trainer import export_merged

    with tempfile.TemporaryDirectory(dir=src) as tmp:
        merged = export_merged(src, Path(tmp) / "merged", args.onto)
        export_compressed(args.run_dir, args.format, args.out, model_dir=merged, rank=args.rank)
        shutil.rmtree(merged, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtune", usage=USAGE)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("recipe")
    p_run.add_argument("overrides", nargs="*")
    p_eval = sub.add_parser("eval")
    p_eval.add_argument("args", nargs="*")
    p_gen = sub.add_parser("generate")
    p_gen.add_argument("args", nargs="*")
    p_q = sub.add_parser("quantize")
    p_q.add_argument("args", nargs="*")
    p_prune = sub.add_parser("prune")
    p_prune.add_argument("args", nargs="*")
    p_exp = sub.add_parser("export")
    p_exp.add_argument("run_dir")
    p_exp.add_argument(
        "--merge",
        action="store_true",
        help="merge the run's adapter into the base weights before "
        "writing: always so for --format hf, dfloat11 and sparse; for sparse-nf4 / sparse-int8 the "
        "adapter is otherwise kept beside the quantized values, in full precision",
    )
    p_exp.add_argument(
        "--format",
        default="hf",
        help="hf (the merged model, default) | dfloat11 | sparse | sparse-nf4 | sparse-int8 | gguf (llama.cpp) | "
        "gguf-lora (a LoRA run's adapter for llama.cpp) | compressed-tensors (vLLM: int-k / q4_0 codes as stored)",
    )
    p_exp.add_argument(
        "--gguf-type",
        default="f16",
        help="--format gguf: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k | q6_k (the decoder's linear "
        "weights; a K type falls back to q5_0 / q8_0 for rows that are not whole 256-value blocks)",
    )
    p_exp.add_argument(
        "--rank",
        type=int,
        default=0,
        help="sparse-nf4 / sparse-int8: keep rank-R factors beside "
        "the quantized kept values (LQ-LoRA's decomposition on the kept entries)",
    )
    p_exp.add_argument("--out", default=None, help="output dir (default RUN_DIR/merged)")
    p_exp.add_argument(
        "--onto",
        default="full",
        choices=["full", "quantized"],
        help="merge into the full-precision base (default) or into dequant(Q), the quantized "
        "base the adapter was trained against",
    )
    p_plan = sub.add_parser("plan")
    p_plan.add_argument("recipe")
    p_plan.add_argument("overrides", nargs="*")
    p_plan.add_argument("--json", action="store_true", help="print one JSON object (peak_memory_bytes, breakdown)")
    p_plan.add_argument(
        "--fit",
        default=None,
        metavar="BUDGET",
        help="e.g. 24GiB, 800MiB, bytes: print the overrides (last line) whose predicted peak fits",
    )
    p_plan.add_argument("--nproc", type=int, default=None, help="processes (ranks); default WORLD_SIZE or 1")
    p_plan.add_argument(
        "--disk",
        default=None,
        metavar="BUDGET",
        help="e.g. 60GB: the disk the run may write (store, snapshots, checkpoints, final/); --fit keeps within it",
    )
    p_data = sub.add_parser("data")
    p_data.add_argument("action", choices=["prepare"])
    p_data.add_argument("recipe")
    p_data.add_argument("overrides", nargs="*")
    sub.add_parser("recipes")
    p_cfg = sub.add_parser("config")
    p_cfg.add_argument("action", choices=["show"])
    p_cfg.add_argument("recipe")
    p_cfg.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from slimtune import config as C

    try:
        if args.cmd == "recipes":
            for name in C.list_recipes():
                print(name)
        elif args.cmd == "data":
            cfg = C.load_config(args.recipe, args.overrides)
            _quiet_libraries()
            from slimtune.data.prepare import prepare_command
            from slimtune.formats.hf import load_tokenizer

            print(json.dumps(prepare_command(cfg, load_tokenizer(cfg.model.name))))
        elif args.cmd == "config":
            print(C.dump_yaml(C.load_config(args.recipe, args.overrides)), end="")
        elif args.cmd == "run":
            cfg = C.load_config(args.recipe, args.overrides)
            _quiet_libraries()
            from slimtune.trainer import run

            run(cfg)
        elif args.cmd == "eval":
            recipe, overrides = _split_recipe(args.args)
            cfg = _load(C, recipe, overrides)
            whole = "data.source" in C.given_keys(recipe, overrides) and not cfg.eval.split
            _quiet_libraries()
            from slimtune.trainer.evaluate import evaluate_model

            with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON result only
                result = evaluate_model(cfg, whole_text=whole)
            print(json.dumps(result))
        elif args.cmd == "generate":
            from slimtune.trainer.generate import generate, split_args

            recipe, rest = _split_recipe(args.args)
            gen, overrides = split_args(rest)
            cfg = _load(C, recipe, overrides)
            _quiet_libraries()
            with contextlib.redirect_stdout(sys.stderr):  # stdout holds the continuation only
                text = generate(cfg, gen, log=lambda s: print(s, file=sys.stderr))
            print(text)
        elif args.cmd == "quantize":
            recipe, overrides = _split_recipe(args.args)
            cfg = _load(C, recipe, overrides)
            _quiet_libraries()
            from slimtune.model.quantize import quantize_command

            quantize_command(cfg)
        elif args.cmd == "prune":
            recipe, overrides = _split_recipe(args.args)
            cfg = _load(C, recipe, overrides)
            _quiet_libraries()
            from slimtune.model.commands import prune_command

            prune_command(cfg)
        elif args.cmd == "plan":
            _quiet_libraries()
            from slimtune.plan.cli import plan_command

            return plan_command(args.recipe, args.overrides, args.json, args.fit, args.nproc, args.disk)
        elif args.cmd == "export" and args.format == "gguf":
            _quiet_libraries()
            from slimtune.trainer.export import export_gguf

            summary = export_gguf(args.run_dir, args.out, args.gguf_type, args.onto)
            print(f"slimtune: wrote {summary['path']} ({json.dumps(summary)})")
        elif args.cmd == "export" and args.format == "compressed-tensors":
            _quiet_libraries()
            from slimtune.trainer.export import export_compressed_tensors

            summary = export_compressed_tensors(args.run_dir, args.out, args.onto)
            print(f"slimtune: wrote {summary['path']} ({json.dumps(summary)})")
        elif args.cmd == "export" and args.format == "gguf-lora":
            _quiet_libraries()
            from slimtune.trainer.export import export_gguf_lora

            summary = export_gguf_lora(args.run_dir, args.out)
            print(f"slimtune: wrote {summary['path']} ({json.dumps(summary)})")
        elif args.cmd == "export" and args.format != "hf":
            _quiet_libraries()
            from slimtune.formats.compressed_io import export_compressed

            _export_compressed(args, export_compressed)
        elif args.cmd == "export":
            _quiet_libraries()
            from slimtune.trainer import export_merged

            print(f"slimtune: wrote merged model to {export_merged(args.run_dir, args.out, args.onto)}")
    except SlimtuneError as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
