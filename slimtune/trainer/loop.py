"""The training loop: `run` = setup -> train -> finish. setup checks, loads and builds (nothing is written until
all of it succeeded); train runs the steps (lr -> micro-steps -> clip -> step -> log -> eval/save); finish
evaluates, saves final/ and assembles the report in one place (`build_report`).

Launch: `slimtune run qlora` or `torchrun --nproc_per_node 2 -m slimtune run qlora` (same code; DDP when
WORLD_SIZE > 1; only rank 0 writes). Global batch = batch_size x grad_accum x world tokens blocks; the
loss is the mean over every target token of that global batch (one denominator for all micro-batches
and ranks, so 1 process x accum 2 == 2 processes x accum 1).
"""

from __future__ import annotations

import contextlib
import gc
import contextvars
import math
import time
from dataclasses import dataclass, field
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
from slimtune.lm_loss import count_targets
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
from slimtune.trainer.report import (
    MetricsLog,
    optimizer_state_bytes,
    peak_memory,
    plot_loss,
    print_main,
    reset_peak_memory,
    start_wandb,
    summary_line,
)


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
            raise SlimtuneError(
                f"resume=true but {out}/checkpoints holds no complete checkpoint; drop resume=true "
                "(add overwrite=true to replace the run) or give the output_dir of a checkpointed run"
            )
        check_resume(ckpts[-1], cfg, world)
        return ckpts[-1]
    holds_run = any((out / f).exists() for f in ("metrics.jsonl", "report.json", "checkpoints"))
    if holds_run and not cfg.overwrite:
        raise SlimtuneError(
            f"output_dir={str(out)!r} already holds a run; pass resume=true to continue it, "
            "overwrite=true to replace it, or another output_dir"
        )
    return None


def run(cfg: C.RecipeConfig, hooks: list[Hooks] = ()) -> dict:
    """Train per `cfg`; returns the report dict (also written to output_dir/report.json on rank 0). However it
    ends, the engine is closed: its threads, buffers and locks go (checkpoints stay)."""
    opened = []  # the engine, from when it is built until finish closes it
    try:  # in a copy of the caller's context: the run's kernel backend (kernels.configure) stays the run's
        return contextvars.copy_context().run(_run, cfg, list(hooks), opened)
    except BaseException:
        for engine in opened:
            with contextlib.suppress(Exception):  # the error raised is the original one
                engine.close()
        raise
    finally:
        # the run's reference cycles (modules and their hooks, FSDP2's state with its collectives' work objects)
        # freed now, while the interpreter is whole: gloo's threads freeing them at exit can abort the process
        gc.collect()


def _run(cfg: C.RecipeConfig, hooks: list[Hooks], opened: list) -> dict:
    session = setup(cfg, hooks, opened)
    train(session)
    return finish(session, opened)


@dataclass
class Session:
    """What setup builds and train / finish use: the resolved config, the process, the data, the built model with
    its engine and optimizer, the outputs, and the counters a checkpoint carries."""

    cfg: C.RecipeConfig  # model.dtype resolved
    requested: C.RecipeConfig  # as given (model.dtype=auto kept): report.json's config
    dtype_choice: dict
    device: torch.device
    info: dist.DistInfo
    out: Path
    config_yaml: str
    tokenizer: object
    data: object  # data.Splits: train / eval blocks
    built: object  # model/pipeline.Built: model, engine, quantization summary, recovery, hooks
    optimizer: object
    hooks: list
    planned_peak: int | None  # report.json's planned_peak_memory_bytes
    metrics: MetricsLog | None = None
    wandb_run: object = None
    step: int = 0
    state: dict = field(default_factory=dict)  # a resumed checkpoint's trainer state
    tokens_seen: int = 0
    train_seconds: float = 0.0
    session_tokens: int = 0
    session_seconds: float = 0.0
    ppl_before: float | None = None

    @property
    def engine(self):
        return self.built.engine

    @property
    def model(self):
        return self.built.model

    def evaluate(self) -> float:
        t = self.cfg.train
        return self.engine.evaluate(
            lambda m: perplexity(
                m,
                self.data.eval,
                t.batch_size,
                self.cfg.eval.max_batches,
                self.device,
                self.info,
                lockstep=self.engine.sharded,
            )
        )


def setup(cfg: C.RecipeConfig, hooks: list[Hooks], opened: list) -> Session:
    """Everything before the first step: refuse what cannot train (before anything loads), load data and model,
    build the engine and optimizer, restore a checkpoint; only then write config.yaml."""
    t = cfg.train
    device = dist.pick_device(t.device)
    reset_peak_memory(device)
    kernels.configure(t.kernels, device)  # validates SLIMTUNE_KERNELS before anything loads
    hooks = [HOOKS.get(name).build(cfg) for name in cfg.hooks] + hooks
    info = dist.setup(device)
    check_run(cfg, info.world)  # the combination trains, or is refused here: before anything loads
    ctx_len = context_length(cfg.model.name)
    if t.seq_len > ctx_len:
        raise SlimtuneError(f"train.seq_len={t.seq_len} exceeds the model's context of {ctx_len} tokens")
    resume_from = check_output_dir(cfg, info.world)
    dist.barrier(info)  # every rank has checked output_dir before rank 0 writes to it
    config_yaml, requested = C.dump_yaml(cfg), cfg  # config.yaml keeps model.dtype=auto; report.json the choice
    cfg, dtype_choice = resolve_dtype(cfg, device, resumed=checkpoint_dtype(resume_from))
    print_main(f"slimtune: compute dtype {dtype_choice['dtype']} ({dtype_choice['reason']})", info.is_main)

    def log(s):
        print_main(s, info.is_main)

    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    data = splits_for(cfg, tokenizer)
    if t.epochs > 0:  # passes over the train blocks: max_steps follows from the data (every stage reads it)
        per_step = t.batch_size * t.grad_accum * info.world
        cfg = C.replace(cfg, **{"train.max_steps": max(1, math.ceil(t.epochs * len(data.train) / per_step))})
        log(f"slimtune: train.epochs={t.epochs:g} over {len(data.train)} blocks: {cfg.train.max_steps} steps")
    built = build_model(cfg, device, info, data.train, log=log)
    opened.append(built.engine)
    if cfg.data.select != "all":  # recovery data: the blocks the pruning hurt most (or a random subset)
        data.train = select_data(
            cfg.data, cfg.train, built.recovery, built.model, data.train, device, cfg.model.dtype, log=log
        )
    optimizer = built.engine.make_optimizer()
    s = Session(
        cfg,
        requested,
        dtype_choice,
        device,
        info,
        Path(cfg.output_dir),
        config_yaml,
        tokenizer,
        data,
        built,
        optimizer,
        hooks + built.hooks,
        planned_peak(cfg, info.world, device.type),
    )
    for h in s.hooks:
        h.on_setup(s.model, optimizer, cfg)
    if resume_from is not None:
        s.state = s.engine.load_checkpoint(resume_from)
        s.step = s.state["step"]
        for h in s.hooks:
            h.on_load(resume_from, s.step)
        log(f"slimtune: resumed from {resume_from} (step {s.step})")
    if info.is_main:  # only now that data, model and checkpoint all loaded: bad input writes nothing
        s.out.mkdir(parents=True, exist_ok=True)
        write_text(s.out / "config.yaml", config_yaml)
        s.wandb_run = start_wandb(cfg, C.to_dict(cfg), s.out)
        s.metrics = MetricsLog(s.out / "metrics.jsonl", s.step if resume_from else None, s.wandb_run)
    s.ppl_before = s.state["eval_perplexity_before"] if "eval_perplexity_before" in s.state else s.evaluate()
    s.tokens_seen, s.train_seconds = s.state.get("tokens", 0), s.state.get("seconds", 0.0)
    return s


def train(s: Session) -> None:
    """The steps from s.step to train.max_steps: each logged, evaluated and checkpointed per cfg."""
    cfg, t, info = s.cfg, s.cfg.train, s.info
    order = BatchOrder(len(s.data.train), t.seed, s.data.train.lengths())
    bar = tqdm(
        total=t.max_steps,
        initial=s.step,
        disable=not (info.is_main and cfg.logging.progress),
        desc="train",
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    s.model.train()
    while s.step < t.max_steps:
        row = train_step(s, order)
        if cfg.eval.every and s.step % cfg.eval.every == 0 and s.step < t.max_steps:
            row["eval_perplexity"] = s.evaluate()
        if s.metrics is not None:
            s.metrics.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if cfg.checkpoint.every and s.step % cfg.checkpoint.every == 0 and s.step < t.max_steps:
            save_checkpoint(s)
    bar.close()
    s.session_seconds = time.perf_counter() - start


def train_step(s: Session, order: BatchOrder) -> dict:
    """One optimizer step over the global batch; returns its metrics row."""
    cfg, t, info, engine = s.cfg, s.cfg.train, s.info, s.engine
    t0 = time.perf_counter()
    # per-step reseeding makes dropout a function of (seed, step, rank): resume is exact on every rank
    torch.manual_seed(t.seed * 1_000_003 + s.step * 1009 + info.rank)
    lr = lr_at(s.step, t)
    set_lr(s.optimizer, lr)  # times each group's lr_scale (LoRA+)
    batches = [
        micro_batch(s.data.train, order, s.step, m, info.rank, info.world, t.batch_size, t.grad_accum)
        for m in range(t.grad_accum)
    ]
    n_targets = dist.all_reduce_sum(torch.tensor(float(sum(count_targets(y) for _, y, _ in batches))), info)
    loss_sum = torch.zeros(())
    for m, (x, y, pos) in enumerate(batches):
        loss_sum += engine.forward_backward(x, y, n_targets, last=m == t.grad_accum - 1, pos=pos)
    if cfg.optim.cram:  # CrAM: the same batch again at the compressed, perturbed weights
        s.optimizer.perturb()
        for m, (x, y, pos) in enumerate(batches):
            engine.forward_backward(x, y, n_targets, last=m == t.grad_accum - 1, pos=pos)
        s.optimizer.restore()  # grad = g~ + g: clipping and hooks see the combined gradient
    for h in s.hooks:
        h.after_backward(s.model, s.step)
    grad_norm = engine.clip_grad_norm(t.max_grad_norm)
    for h in s.hooks:
        h.before_step(s.optimizer, s.step)
    engine.step()
    s.step += 1
    for h in s.hooks:
        h.after_step(s.model, s.optimizer, s.step)
    loss = (dist.all_reduce_sum(loss_sum, info) / n_targets.clamp(min=1)).item()
    step_tokens = sum(x.numel() for x, _, _ in batches) * info.world
    s.tokens_seen += step_tokens
    s.session_tokens += step_tokens
    s.train_seconds += time.perf_counter() - t0
    if not math.isfinite(loss):
        raise SlimtuneError(f"loss became {loss} at step {s.step}; lower train.lr or check the data")
    row = {"step": s.step, "loss": loss, "lr": lr, "tokens": s.tokens_seen, "seconds": round(s.train_seconds, 4)}
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    return row


def save_checkpoint(s: Session) -> None:
    if s.info.is_main or s.engine.gathers_state:  # gathered on every rank, written by rank 0
        s.engine.save_checkpoint(
            s.out / "checkpoints",
            s.step,
            {
                "tokens": s.tokens_seen,
                "seconds": s.train_seconds,
                "eval_perplexity_before": s.ppl_before,
                "world_size": s.info.world,
                "compute_dtype": s.cfg.model.dtype,
            },
            s.config_yaml,
            s.cfg.checkpoint.keep,
        )
    for h in s.hooks:
        h.on_save(s.out / "checkpoints" / f"step_{s.step}", s.step)
    dist.barrier(s.info)


def finish(s: Session, opened: list) -> dict | None:
    """The last eval, final/, and on rank 0 report.json (build_report), loss.png, wandb's summary and the summary
    line; then the engine is closed."""
    ppl_after = s.evaluate()
    report = None
    if s.info.is_main or s.engine.gathers_state:
        s.engine.save_final(s.out / "final", str(base_dir(s.cfg.model.name)), s.tokenizer)
    if s.info.is_main:
        report = build_report(s, ppl_after)
        quant_info = s.built.info
        if "table" in quant_info:
            write_text(s.out / "allocation.txt", quant_info["table"] + "\n")
        write_json(s.out / "report.json", report)
        if s.metrics.rows:
            plot_loss(s.metrics.rows, s.out / "loss.png", [(0, s.ppl_before), (s.step, ppl_after)])
        if s.wandb_run is not None:
            s.wandb_run.summary.update({k: v for k, v in report.items() if k != "config"})
            s.wandb_run.finish()
        print_main(summary_line(report) + f"\nslimtune: wrote {s.out}/", True)
    dist.barrier(s.info)
    opened.remove(s.engine)
    s.engine.close()
    dist.teardown(s.info)
    return report


def build_report(s: Session, ppl_after: float) -> dict:
    """report.json: every figure of the run, in one place."""
    rows = s.metrics.rows
    mem, kind = peak_memory(s.device)
    trainable, total = s.engine.count_params()
    report = {
        "initial_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "eval_perplexity_before": s.ppl_before,
        "eval_perplexity": ppl_after,
        "peak_memory_bytes": mem,
        "peak_memory_kind": kind,
        "trainable_params": trainable,
        "total_params": total,
        "tokens_per_second": s.session_tokens / max(s.session_seconds, 1e-9),
        "steps": s.step,
        "train_blocks": len(s.data.train),
        "wall_seconds": s.train_seconds,
        "world_size": s.info.world,
        "device": str(s.device),
        "config": C.to_dict(s.requested),
        "compute_dtype": s.dtype_choice["dtype"],
        "compute_dtype_reason": s.dtype_choice["reason"],
        "optimizer_state_bytes": optimizer_state_bytes(s.optimizer),
        "low_precision_linears": low_precision_linears(s.model),
    }
    if hasattr(s.optimizer, "projection_seconds"):
        report["projection_seconds"] = s.optimizer.projection_seconds
    report.update(s.engine.report())
    report["planned_peak_memory_bytes"] = s.planned_peak
    quant_info = s.built.info
    if quant_info:
        report["quantization"] = {
            k: quant_info[k] for k in ("bits_per_param", "seconds", "fisher_seconds") if k in quant_info
        }
    return report
