"""What the engine does to the per-rank sizes: each engine declares its own memory terms beside its code
(`memory_terms(cfg, model, sizes, world, device)`: engines/ddp.py, fsdp2.py, deepspeed.py, offload/engine.py);
this module gives them the sizes they read (`Sizes`, `ModelSizes`) and calls the chosen one.

`Sizes` is what one rank holds of each component for the whole run (persistent) and during a step; the
engine returns it adjusted for the engine (everything here is bytes per rank).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slimtune.plan.arch import Arch
from slimtune.engines.offload.settings import offload_active
from slimtune.plan.weights import DTYPE_BYTES, Weights, layer_param_bytes
from slimtune.registry import ENGINES
from slimtune.rules import placement


@dataclass
class Sizes:
    frozen: int  # the frozen base as stored, plus non-trainable adapter tensors
    trainable: int  # fp32 master weights / adapter factors
    grads: int  # gradients after a full backward
    state: int  # optimizer state after its first step
    step: int  # the optimizer step's working memory
    engine: int = 0  # engine buffers (gradient buckets, gathered layers)
    offload: int = 0  # slimtune offload's buffer pool


@dataclass(frozen=True)
class ModelSizes:
    """What the engines' memory terms read of the model, in bytes as the run holds it."""

    layer: int  # one decoder layer's parameters as stored, plus its trainable fp32 tensors
    layer_trainable: int  # one decoder layer's trainable fp32 tensors
    root: int  # the parameters outside the decoder layers (embedding, final norm, head)
    root_largest: int  # the largest of them
    root_norms: int  # the norms among them
    adapter_resident: int  # adapter buffers and statistics (the offload engine's resident unit keeps them)
    full: bool  # full fine-tuning (adapter.type=none): every parameter an fp32 master weight


def model_sizes(cfg, arch: Arch, w: Weights) -> ModelSizes:
    full = cfg.adapter.type == "none"
    trainable = w.master * sum(t.numel for t in w.trainable if _layer_of(arch, t.name) == 0)
    layer = trainable if full else layer_param_bytes(arch, w, DTYPE_BYTES[cfg.model.dtype]) + trainable
    per = w.master if full else DTYPE_BYTES[cfg.model.dtype]
    root = [p for p in arch.params if p.layer is None]
    return ModelSizes(
        layer,
        trainable,
        per * sum(p.numel for p in root),
        max(per * p.numel for p in root),
        per * sum(p.numel for p in root if p.kind == "other"),
        w.adapter_buffers + w.regrowth,
        full,
    )


def per_rank(cfg, arch: Arch, w: Weights, sizes: Sizes, world: int, device: str) -> Sizes:
    """sizes for one rank under cfg.engine (the engine's own memory_terms)."""
    engine = ENGINES.get(cfg.engine.name)
    return engine.memory_terms(cfg, model_sizes(cfg, arch, w), dataclasses.replace(sizes), world, device)


def _layer_of(arch: Arch, name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def offload_recompute(cfg, arch: Arch, device: str) -> bool | None:
    """Whether the offload engine recomputes each decoder layer in backward (it ignores
    train.activation_checkpointing); None when the offload engine is not used. offload.activations=auto keeps
    them as engines/offload/settings.keep_activations decides: within 1/16 of RAM and no streamed quantized base."""
    import os

    o = cfg.offload
    if not offload_active(cfg):
        return None
    if o.activations != "auto":
        return o.activations == "recompute"
    if placement(cfg)[0] == "disk" and cfg.quant.method != "none":
        return True
    size = DTYPE_BYTES[cfg.optim.master_dtype if cfg.adapter.type == "none" else cfg.model.dtype]
    per_token = (
        12 * arch.hidden
        + 5 * arch.intermediate
        + (2 * arch.heads * cfg.train.seq_len if arch.attn_impl == "eager" else 0)
    )
    tokens = cfg.train.batch_size * cfg.train.seq_len
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return per_token * tokens * arch.layers * size > ram / 16
