"""Perplexity on the eval split, and parameter counts for the report."""

from __future__ import annotations

import contextvars
import math

import torch
import torch.nn as nn

from slimtune import kernels
from slimtune.chat import set_chat_template
from slimtune.formats.compressed_memory import to_device
from slimtune.data import Blocks, eval_batches, splits_for, text_windows
from slimtune.hardware import fixed_dtype
from slimtune.lm_loss import CausalLMLoss, count_targets
from slimtune.formats.hf import load_tokenizer
from slimtune.engines import dist
from slimtune.model.pipeline import build_for_eval


def _on(device, x, y, pos) -> tuple:
    return (x.to(device), y.to(device)) + (() if pos is None else (pos.to(device),))


@torch.no_grad()
def loss_totals(
    loss_model: nn.Module,
    blocks: Blocks,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    info: dist.DistInfo = dist.DistInfo(),
    lockstep: bool = False,
) -> tuple[float, int]:
    """(summed next-token CE in nats, target tokens) over the blocks (at most max_batches batches, 0 = all);
    ranks split the batches and sum their totals. lockstep (a sharded model, whose forward is collective):
    every rank runs as many forwards as the busiest one, the extra ones on its first batch, not counted."""
    was_training = loss_model.training
    loss_model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    mine = list(eval_batches(blocks, batch_size, max_batches, info.rank, info.world))
    extra = 0
    if lockstep and info.enabled:
        most = dist.all_reduce_max(torch.tensor(float(len(mine))), info)
        extra = int(most) - len(mine)
    for x, y, pos in mine:
        totals[0] += float(loss_model(*_on(device, x, y, pos)))
        totals[1] += count_targets(y)
    for _ in range(extra):
        loss_model(*_on(device, *next(eval_batches(blocks, batch_size, 1))))
    dist.all_reduce_sum(totals, info)
    loss_model.train(was_training)
    return float(totals[0]), int(totals[1])


def perplexity(
    loss_model: nn.Module,
    blocks: Blocks,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    info: dist.DistInfo = dist.DistInfo(),
    lockstep: bool = False,
) -> float:
    """exp(mean next-token CE) over the eval blocks."""
    nats, tokens = loss_totals(loss_model, blocks, batch_size, max_batches, device, info, lockstep)
    return math.exp(nats / tokens) if tokens > 0 else float("nan")


def evaluate_model(cfg, whole_text: bool = False) -> dict:
    """`slimtune eval`: score model.name (an HF dir, a built-in name, a quantized checkpoint, or an adapter
    dir such as runs/a/final on the base it was trained on). whole_text: every non-overlapping
    train.seq_len window of data.source, uncapped; else the eval split (capped by eval.max_batches), as a
    run's own eval does. Returns eval_perplexity, eval_loss (mean nats per target token), eval_tokens.
    model.dtype=auto (not resolved by the command line) computes in fp32."""
    return contextvars.copy_context().run(_evaluate, cfg, whole_text)  # its kernel backend stays its own


def _evaluate(cfg, whole_text: bool) -> dict:
    cfg = fixed_dtype(cfg)
    device = dist.pick_device(cfg.train.device)
    kernels.configure(cfg.train.kernels, device)
    tokenizer = load_tokenizer(cfg.model.name)
    t = cfg.train
    if whole_text:
        if cfg.data.chat_template:
            set_chat_template(tokenizer, cfg.data.chat_template)
        parts, cap = (
            text_windows(cfg.data.source, tokenizer, t.seq_len, cfg.data.train_on, cfg.data.cache_dir or None),
            0,
        )
    else:
        parts, cap = [splits_for(cfg, tokenizer).eval], cfg.eval.max_batches
    model = to_device(build_for_eval(cfg), device)  # a keep_compressed model stays encoded on the device
    loss_model = CausalLMLoss(model, t.loss_chunk_tokens)
    nats, tokens = 0.0, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16"):
        for blocks in parts:
            n, k = loss_totals(loss_model, blocks, t.batch_size, cap, device)
            nats, tokens = nats + n, tokens + k
    loss = nats / tokens if tokens else float("nan")
    return {
        "model": cfg.model.name,
        "data": cfg.data.source,
        "seq_len": t.seq_len,
        "scored": "whole text" if whole_text else "eval split",
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss) if tokens else float("nan"),
        "eval_tokens": tokens,
    }
