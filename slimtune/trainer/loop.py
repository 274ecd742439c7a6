"""The training loop, top to bottom: setup, then per step lr -> micro-steps -> clip -> step -> log -> eval/save.

Launch: `slimtune run qlora` or `torchrun --nproc_per_node 2 -m slimtune run qlora` (same code; DDP when
WORLD_SIZE > 1; only rank 0 writes). Global batch = batch_size x grad_accum x world tokens blocks; the
loss is the mean over every target token of that global batch (one denominator for all micro-batches
and ranks, so 1 process x accum 2 == 2 processes x accum 1).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from slimtune import config as C
from slimtune import kernels
from slimtune.model.recovery import select_data
from slimtune.data import BatchOrder, micro_batch, splits_for
from slimtune.errors import SlimtuneError
from slimtune.hardware import resolve_dtype
from slimtune.io import write_json, write_text
from slimtune.loss import count_targets
from slimtune.optim import set_lr
from slimtune.formats.hf import base_dir, context_length, load_tokenizer
from slimtune.precision.swap import low_precision_linears
from slimtune.registry import HOOKS
from slimtune.engines import dist
from slimtune.formats.checkpoint import check_resume, checkpoint_dtype, complete_checkpoints
from slimtune.trainer.evaluate import perplexity
from slimtune.trainer.hooks import Hooks
from slimtune.model.pipeline import build_model
from slimtune.plan.report import planned_peak
from slimtune.trainer.preflight import check_run
from slimtune.trainer.report import (MetricsLog, optimizer_state_bytes, peak_memory, plot_loss, print_main,
                                     reset_peak_memory, start_wandb, summary_line)


def lr_at(step: int, t: C.TrainConfig) -> float:
    """Linear warmup to t.lr, then cosine decay to t.lr * t.min_lr_ratio at t.max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_output_dir(cfg: C.RecipeConfig, world: int) -> Path | None:
    """Refuse to clobber an earlier run; returns the checkpoint to resume from (or None). resume=true needs
    a complete checkpoint whose config is compatible with `cfg` (checkpoint.check_resume)."""
    out = Path(cfg.output_dir)
    if cfg.resume:
        ckpts = complete_checkpoints(out / "checkpoints")
        if not ckpts:
            raise SlimtuneError(f"resume=true but {out}/checkpoints holds no complete checkpoint; drop resume=true "
                                "(add overwrite=true to replace the run) or give the output_dir of a checkpointed run")
        check_resume(ckpts[-1], cfg, world)
        return ckpts[-1]
    holds_run = any((out / f).exists() for f in ("metrics.jsonl", "report.json", "checkpoints"))
    if holds_run and not cfg.overwrite:
        raise SlimtuneError(f"output_dir={str(out)!r} already holds a run; pass resume=true to continue it, "
                            "overwrite=true to replace it, or another output_dir")
    return None


def run(cfg: C.RecipeConfig, hooks: list[Hooks] = ()) -> dict:
    """Train per `cfg`; returns the report dict (also written to output_dir/report.json on rank 0). However it
    ends, the engine is closed: its threads, buffers and locks go (checkpoints stay)."""
    opened = []  # the engine, from when it is built until _run closes it
    try:
        return _run(cfg, hooks, opened)
    except BaseException:
        for engine in opened:
            with contextlib.suppress(Exception):  # the error raised is the original one
                engine.close()
        raise


def _run(cfg: C.RecipeConfig, hooks: list[Hooks], opened: list) -> dict:
    t = cfg.train
    device = dist.pick_device(t.device)
    reset_peak_memory(device)
    kernels.configure(t.kernels, device)  # validates SLIMTUNE_KERNELS before anything loads
    hooks = [HOOKS.get(name)() for name in cfg.hooks] + list(hooks)
    info = dist.setup(device)
    check_run(cfg, info.world)  # the combination trains, or is refused here: before anything loads
    ctx_len = context_length(cfg.model.name)
    if t.seq_len > ctx_len:
        raise SlimtuneError(f"train.seq_len={t.seq_len} exceeds the model's context of {ctx_len} tokens")
    resume_from = check_output_dir(cfg, info.world)
    dist.barrier(info)  # every rank has checked output_dir before rank 0 writes to it
    out = Path(cfg.output_dir)
    config_yaml, requested = C.dump_yaml(cfg), cfg  # config.yaml keeps model.dtype=auto; report.json the choice
    cfg, dtype_choice = resolve_dtype(cfg, device, resumed=checkpoint_dtype(resume_from))
    print_main(f"slimtune: compute dtype {dtype_choice['dtype']} ({dtype_choice['reason']})", info.is_main)

    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    data = splits_for(cfg, tokenizer)
    built = build_model(cfg, device, info, data.train, log=lambda s: print_main(s, info.is_main))
    planned = planned_peak(cfg, info.world, device.type)  # report.json's planned_peak_memory_bytes
    engine, model, quant_info = built.engine, built.model, built.info
    opened.append(engine)
    hooks = hooks + built.hooks
    if cfg.data.select != "all":  # recovery data: the blocks the pruning hurt most (or a random subset)
        data.train = select_data(cfg, built.recovery, model, data.train, device,
                                 log=lambda s: print_main(s, info.is_main))
    optimizer = engine.make_optimizer()
    for h in hooks:
        h.on_setup(model, optimizer, cfg)

    step, state = 0, {}
    if resume_from is not None:
        state = engine.load_checkpoint(resume_from)
        step = state["step"]
        for h in hooks:
            h.on_load(resume_from, step)
        print_main(f"slimtune: resumed from {resume_from} (step {step})", info.is_main)
    if info.is_main:  # only now that data, model and checkpoint all loaded: bad input writes nothing
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", config_yaml)
    wandb_run = start_wandb(cfg, C.to_dict(cfg), out) if info.is_main else None
    metrics = MetricsLog(out / "metrics.jsonl", step if resume_from else None, wandb_run) if info.is_main else None

    def evaluate():
        return engine.evaluate(lambda m: perplexity(m, data.eval, t.batch_size, cfg.eval.max_batches, device, info,
                                                    lockstep=engine.sharded))

    ppl_before = state["eval_perplexity_before"] if "eval_perplexity_before" in state else evaluate()
    tokens_seen, train_seconds = state.get("tokens", 0), state.get("seconds", 0.0)
    order = BatchOrder(len(data.train), t.seed, data.train.lengths())
    bar = tqdm(total=t.max_steps, initial=step, disable=not (info.is_main and cfg.logging.progress),
               desc="train", dynamic_ncols=True)
    session_tokens, session_start = 0, time.perf_counter()
    model.train()
    while step < t.max_steps:
        t0 = time.perf_counter()
        # per-step reseeding makes dropout a function of (seed, step, rank): resume is exact on every rank
        torch.manual_seed(t.seed * 1_000_003 + step * 1009 + info.rank)
        lr = lr_at(step, t)
        set_lr(optimizer, lr)  # times each group's lr_scale (LoRA+)
        batches = [micro_batch(data.train, order, step, m, info.rank, info.world, t.batch_size, t.grad_accum)
                   for m in range(t.grad_accum)]
        n_targets = dist.all_reduce_sum(torch.tensor(float(sum(count_targets(y) for _, y, _ in batches))), info)
        loss_sum = torch.zeros(())
        for m, (x, y, pos) in enumerate(batches):
            loss_sum += engine.forward_backward(x, y, n_targets, last=m == t.grad_accum - 1, pos=pos)
        if cfg.optim.cram:  # CrAM: the same batch again at the compressed, perturbed weights
            optimizer.perturb()
            for m, (x, y, pos) in enumerate(batches):
                engine.forward_backward(x, y, n_targets, last=m == t.grad_accum - 1, pos=pos)
            optimizer.restore()  # grad = g~ + g: clipping and hooks see the combined gradient
        for h in hooks:
            h.after_backward(model, step)
        grad_norm = engine.clip_grad_norm(t.max_grad_norm)
        for h in hooks:
            h.before_step(optimizer, step)
        engine.step()
        step += 1
        for h in hooks:
            h.after_step(model, optimizer, step)
        loss = (dist.all_reduce_sum(loss_sum, info) / n_targets.clamp(min=1)).item()
        step_tokens = sum(x.numel() for x, _, _ in batches) * info.world
        tokens_seen += step_tokens
        session_tokens += step_tokens
        dt = time.perf_counter() - t0
        train_seconds += dt
        if not math.isfinite(loss):
            raise SlimtuneError(f"loss became {loss} at step {step}; lower train.lr or check the data")
        row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens_seen, "seconds": round(train_seconds, 4)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < t.max_steps:
            row["eval_perplexity"] = evaluate()
        if metrics is not None:
            metrics.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.max_steps:
            if info.is_main or engine.gathers_state:  # gathered on every rank, written by rank 0
                engine.save_checkpoint(out / "checkpoints", step, {"tokens": tokens_seen, "seconds": train_seconds,
                                       "eval_perplexity_before": ppl_before, "world_size": info.world,
                                       "compute_dtype": cfg.model.dtype},
                                       config_yaml, cfg.checkpoint.keep)
            for h in hooks:
                h.on_save(out / "checkpoints" / f"step_{step}", step)
            dist.barrier(info)
    bar.close()
    session_seconds = time.perf_counter() - session_start

    ppl_after = evaluate()
    report = None
    if info.is_main or engine.gathers_state:
        engine.save_final(out / "final", str(base_dir(cfg.model.name)), tokenizer)
    if info.is_main:
        rows = metrics.rows
        mem, kind = peak_memory(device)
        trainable, total = engine.count_params()
        report = {
            "initial_loss": rows[0]["loss"] if rows else None,
            "final_loss": rows[-1]["loss"] if rows else None,
            "eval_perplexity_before": ppl_before,
            "eval_perplexity": ppl_after,
            "peak_memory_bytes": mem,
            "peak_memory_kind": kind,
            "trainable_params": trainable,
            "total_params": total,
            "tokens_per_second": session_tokens / max(session_seconds, 1e-9),
            "steps": step,
            "train_blocks": len(data.train),
            "wall_seconds": train_seconds,
            "world_size": info.world,
            "device": str(device),
            "config": C.to_dict(requested),
            "compute_dtype": dtype_choice["dtype"],
            "compute_dtype_reason": dtype_choice["reason"],
        }
        report["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
        if hasattr(optimizer, "projection_seconds"):
            report["projection_seconds"] = optimizer.projection_seconds
        report["low_precision_linears"] = low_precision_linears(model)
        report.update(engine.report())
        report["planned_peak_memory_bytes"] = planned
        if quant_info:
            report["quantization"] = {k: quant_info[k] for k in ("bits_per_param", "seconds", "fisher_seconds")
                                      if k in quant_info}
            if "table" in quant_info:
                write_text(out / "allocation.txt", quant_info["table"] + "\n")
        write_json(out / "report.json", report)
        if rows:
            plot_loss(rows, out / "loss.png")
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in report.items() if k != "config"})
            wandb_run.finish()
        print_main(summary_line(report) + f"\nslimtune: wrote {out}/", True)
    dist.barrier(info)
    opened.remove(engine)
    engine.close()
    dist.teardown(info)
    return report
