"""What the benchmarks' own-process baselines share: the process's peak RSS, and a plain PyTorch loop training an
HF model on slimtune's batches with a recipe's optimizer settings, lr schedule and clipping (so both sides of a
comparison see the same batches, in the same order, with the same hyperparameters). Run by file path
(runpy): benchmarks/ stays off sys.path, where a module could shadow a package transformers imports."""

from __future__ import annotations

import time


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def train(model, cfg, data) -> tuple[list[float], float]:
    """cfg.train.max_steps steps of AdamW (cfg.optim's betas, eps, weight decay) over the trainable parameters,
    slimtune's lr schedule and clipping, on slimtune's batch order of data.train; HF's own loss (full logits).
    Returns (losses, seconds spent in the steps)."""
    import torch

    from slimtune.data import BatchOrder, micro_batch
    from slimtune.trainer.loop import lr_at

    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=t.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    order = BatchOrder(len(data.train), t.seed, data.train.lengths())
    losses, seconds = [], 0.0
    model.train()
    for step in range(t.max_steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        x, y, _ = micro_batch(data.train, order, step, 0, 0, 1, t.batch_size, 1)
        loss = model(input_ids=x, labels=y).loss  # HF's loss: full (B, T, V) logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds += time.perf_counter() - t0
    return losses, seconds
