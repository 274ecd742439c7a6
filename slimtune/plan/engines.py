"""What the engine does to the per-rank sizes: DDP replicates, FSDP2 and DeepSpeed ZeRO shard by world size,
slimtune's offload engine keeps weights / optimizer state in its store and streams them through a buffer pool.

`Sizes` is what one rank holds of each component for the whole run (persistent) and during a step; the
engine functions return a copy adjusted for the engine (everything here is bytes per rank).
  ddp           world > 1: the reducer's gradient buckets (a second copy of the gradients, fp32)
  fsdp2         parameters, gradients and optimizer state / W; the unsharded parameters of two decoder layers
                (the one computing and the one prefetched), the root unit (embedding, final norm, head: not
                resharded between forward and backward) and one layer's unsharded gradient
  deepspeed     stage 0: as DDP plus its gradient bucket; >= 1: optimizer state / W and ZeRO's fp32 copy of
                its parameter partition; stage 1 keeps full gradients, >= 2 a partition / W plus the
                reduce bucket; stage 3 parameters / W plus the gathered layer. engine.offload=cpu moves the
                state and the fp32 partition to host memory (on a CPU-only machine that is the same RAM), nvme
                to disk (stage 3: the parameters too)
  offload.*     params=disk: the base is streamed (only the resident unit stays: norms, rotary tables, LoRA
                factors), through (prefetch + 2) layer slabs and one embedding/head slab; optimizer=disk: the
                optimizer state (and a full fine-tuning's fp32 master weights) stay in the store, updated in
                16 MiB chunks; each decoder layer is recomputed in backward unless offload.activations keeps them
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slimtune.plan.arch import Arch
from slimtune.plan.weights import Weights, layer_param_bytes

DS_BUCKET = 500_000_000  # DeepSpeed's default reduce / allgather bucket size, elements
OFFLOAD_CHUNK = 2**22 * 4  # offload/store.CHUNK fp32 elements per optimizer chunk
OFFLOAD_READ_AHEAD = 4  # engines/offload/engine.READ_AHEAD


@dataclass
class Sizes:
    frozen: int  # the frozen base as stored, plus non-trainable adapter tensors
    trainable: int  # fp32 master weights / adapter factors
    grads: int  # gradients after a full backward
    state: int  # optimizer state after its first step
    step: int  # the optimizer step's working memory
    engine: int = 0  # engine buffers (gradient buckets, gathered layers)
    offload: int = 0  # slimtune offload's buffer pool


def per_rank(cfg, arch: Arch, w: Weights, sizes: Sizes, world: int, device: str) -> Sizes:
    """sizes for one rank under cfg.engine / cfg.offload."""
    s = dataclasses.replace(sizes)
    e = cfg.engine
    if e.name == "ddp":
        if world > 1:
            s.engine = s.grads
        return _offload(cfg, arch, w, s, device)
    if e.name == "fsdp2":
        return _fsdp2(cfg, arch, w, s, world)
    return _deepspeed(cfg, arch, w, s, world, device)


def _layer_bytes(cfg, arch: Arch, w: Weights) -> tuple[int, int]:
    """(stored bytes of one decoder layer's parameters, its trainable fp32 bytes)."""
    from slimtune.plan.weights import DTYPE_BYTES

    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    trainable = 4 * sum(t.numel for t in w.trainable if _layer_of(arch, t.name) == 0)
    if cfg.adapter.type == "none":
        return trainable, trainable
    return layer_param_bytes(arch, w, dtype_bytes) + trainable, trainable


def _layer_of(arch: Arch, name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _root_bytes(cfg, arch: Arch) -> int:
    """Parameters outside the decoder layers (embedding, final norm, head), as the run holds them."""
    full = cfg.adapter.type == "none"
    per = 4 if full or cfg.model.dtype == "float32" else 2
    return per * sum(p.numel for p in arch.params if p.layer is None)


def _fsdp2(cfg, arch: Arch, w: Weights, s: Sizes, world: int) -> Sizes:
    layer, layer_train = _layer_bytes(cfg, arch, w)
    s.frozen, s.trainable = -(-s.frozen // world), -(-s.trainable // world)
    s.grads, s.state = -(-s.grads // world), -(-s.state // world)
    s.engine = 2 * layer + _root_bytes(cfg, arch) + layer_train
    return s


def _deepspeed(cfg, arch: Arch, w: Weights, s: Sizes, world: int, device: str) -> Sizes:
    e = cfg.engine
    stage, host = e.zero_stage, device == "cpu"
    full_grads = s.grads
    bucket = min(DS_BUCKET * 4, full_grads)
    if stage == 0:
        s.engine = bucket
        return s
    master = -(-s.trainable // world)  # ZeRO's fp32 copy of this rank's partition
    s.state = -(-s.state // world)
    if stage == 1:
        s.grads = full_grads + -(-full_grads // world)
    else:
        s.grads = -(-full_grads // world)
        s.engine = bucket
    if stage == 3:
        layer, _ = _layer_bytes(cfg, arch, w)
        s.frozen, s.trainable = -(-s.frozen // world), -(-s.trainable // world)
        s.engine += 2 * layer + _root_bytes(cfg, arch)
    if e.offload == "nvme":
        s.state, master = 0, 0
        if stage == 3:
            s.frozen, s.trainable = 0, 0
    elif e.offload == "cpu" and not host:  # on the host: not in GPU memory
        s.state, master = 0, 0
    s.trainable += master
    return s


def offload_active(cfg, device: str) -> bool:
    """As engines.offload.engine.offload_active: disk anywhere (cpu means pinned host memory, which only the
    CUDA path distinguishes from none)."""
    o = cfg.offload
    return "disk" in (o.params, o.optimizer) or (device == "cuda" and "cpu" in (o.params, o.optimizer))


def offload_recompute(cfg, arch: Arch, device: str) -> bool | None:
    """Whether the offload engine recomputes each decoder layer in backward (it ignores
    train.activation_checkpointing); None when the offload engine is not used. offload.activations=auto keeps
    them as engines/offload/engine.keep_activations decides: within 1/16 of RAM and no streamed quantized base."""
    import os

    o = cfg.offload
    if not offload_active(cfg, device):
        return None
    if o.activations != "auto":
        return o.activations == "recompute"
    if o.params != "none" and cfg.quant.method != "none":
        return True
    size = 4 if cfg.adapter.type == "none" or cfg.model.dtype == "float32" else 2
    per_token = 12 * arch.hidden + 5 * arch.intermediate + (2 * arch.heads * cfg.train.seq_len
                                                            if arch.attn_impl == "eager" else 0)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return per_token * tokens * arch.layers * size > ram / 16


def _offload(cfg, arch: Arch, w: Weights, s: Sizes, device: str) -> Sizes:
    o = cfg.offload
    if not offload_active(cfg, device):
        return s
    full = cfg.adapter.type == "none"
    layer, layer_train = _layer_bytes(cfg, arch, w)
    per = 4 if full else 2 if cfg.model.dtype == "bfloat16" else 4
    big = max(per * p.numel for p in arch.params if p.layer is None)
    norms = sum(p.numel for p in arch.params if p.layer is None and p.kind == "other")
    if o.params != "none":  # streamed: only the resident unit (norms, rotary, LoRA factors) stays in memory
        s.frozen = 0 if full else norms * per + w.adapter_buffers + w.regrowth
        if full:  # the master weights are the store's
            s.trainable = 4 * norms
        s.offload += layer * (o.prefetch + 2) + big
    if o.optimizer != "none":  # state in the store, updated chunk by chunk; one unit's gradients at a time
        s.state = 0
        if full:
            s.grads = max(layer_train, big)
        s.offload += OFFLOAD_CHUNK * 2 * (OFFLOAD_READ_AHEAD + 2)
    return s
