"""Perplexity on the eval split, and parameter counts for the report."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimtune.data import Blocks, eval_batches
from slimtune.trainer import dist
from slimtune.trainer.loss import count_targets


@torch.no_grad()
def perplexity(loss_model: nn.Module, blocks: Blocks, batch_size: int, max_batches: int,
               device: torch.device, info: dist.DistInfo = dist.DistInfo()) -> float:
    """exp(mean next-token CE) over the eval blocks; ranks split the batches and sum their totals."""
    was_training = loss_model.training
    loss_model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for x, y in eval_batches(blocks, batch_size, max_batches, info.rank, info.world):
        totals[0] += float(loss_model(x.to(device), y.to(device)))
        totals[1] += count_targets(y)
    dist.all_reduce_sum(totals, info)
    loss_model.train(was_training)
    return math.exp(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). A quantized linear counts its logical out x in weights, not packed bytes."""
    from slimtune.quant import is_quantized_linear

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total, skip = 0, set()
    for module in model.modules():
        if is_quantized_linear(module):
            total += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            total += bias.numel() if bias is not None else 0
            skip.update(id(p) for p in module.parameters())
    seen = set()
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return trainable, total


def evaluate_model(cfg) -> dict:
    """`slimtune eval`: perplexity of model.name (an HF dir, a built-in name, or a LoRA adapter dir such
    as runs/a/final) on the eval split of data.source."""
    from pathlib import Path

    from slimtune.data import build_splits
    from slimtune.models import load_model, load_tokenizer
    from slimtune.trainer.loss import CausalLMLoss

    device = dist.pick_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model.name)
    data = build_splits(cfg.data.source, tokenizer, cfg.train.seq_len, cfg.data.eval_fraction)
    model = load_model(cfg.model.name, cfg.model.dtype, cfg.quant, device="cpu")
    if (Path(cfg.model.name) / "adapter_config.json").is_file():
        from slimtune.adapters.peft_format import load_peft_adapter

        load_peft_adapter(model, Path(cfg.model.name))
    model.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16"):
        ppl = perplexity(CausalLMLoss(model, cfg.train.loss_chunk_tokens), data.eval, cfg.train.batch_size,
                         cfg.eval.max_batches, device)
    return {"model": cfg.model.name, "data": cfg.data.source, "eval_blocks": len(data.eval),
            "seq_len": cfg.train.seq_len, "eval_perplexity": ppl}
