"""The engine stage of model setup: how the built model runs forward/backward.

Today: activation checkpointing, the model on its device, the loss module (loss.CausalLMLoss, which DDP
sees as one forward), and DDP under torchrun. An engine that replaces forward/backward/step (offload,
FSDP, DeepSpeed) plugs in here, not through the loop's hooks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.loss import CausalLMLoss
from slimtune.trainer.dist import DistInfo


def activation_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs and DDP
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap(model: nn.Module, t, device: torch.device, info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """(loss_model, train_model): `train_model(input_ids, labels)` is what the loop calls (DDP-wrapped
    under torchrun), `loss_model` the same without DDP (eval). t: TrainConfig."""
    if t.activation_checkpointing:
        activation_checkpointing(model)
    model.to(device)
    loss_model = CausalLMLoss(model, t.loss_chunk_tokens)
    # quantized bases are built identically on every rank, so buffers need no broadcast
    train_model = nn.parallel.DistributedDataParallel(loss_model, broadcast_buffers=False) if info.enabled else loss_model
    return loss_model, train_model
