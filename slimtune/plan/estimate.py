"""The predicted peak memory of a run, from its resolved config and the model's config.json (no weights read).

The run is a sequence of phases; each phase is a set of components live together, and the peak is the
largest phase. On CPU the figure is the process's peak RSS (report.json's cpu_peak_rss); on CUDA what
nvidia-smi shows for the process (context + the caching allocator's reserve). Per rank, under the engine.
  load     the base in its load dtype, plus the safetensors pages read (mmapped, resident while loading);
           LQ-LoRA / LoftQ / EoRA: the base with the Fisher pass (an fp32 sum and a gradient per target, one
           calibration sample's activations) and the decomposition's copies of one matrix
  train    what the run keeps (weights, adapter, optimizer state, engine buffers) plus the larger of:
             forward   the saved activations of one micro-batch and the loss's chunk buffers
             backward  the saved activations, one layer's working gradients (a recomputed layer's saved
                       tensors under activation checkpointing), the gradients accumulated so far
             step      every gradient and the optimizer step's working memory
  eval     the weights and one no-grad forward (logits chunks)
  save     final/: a full fine-tuning's weights serialized (one copy of the model in model.dtype)
On CPU each phase adds the process's libraries, tokenizer and data, the runtime, and the heap fragmentation
of the training step (platform.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from slimtune.plan import platform as P
from slimtune.plan.activations import activations
from slimtune.plan.disk import disk_bytes
from slimtune.plan.arch import Arch, architecture
from slimtune.engines.offload.settings import offload_active
from slimtune.plan.engines import Sizes, offload_recompute, per_rank
from slimtune.plan.optimizer import state_bytes, step_transient_bytes
from slimtune.plan.weights import DTYPE_BYTES, Weights, model_weights
from slimtune.registry import HOOKS, OPTIMIZERS
from slimtune.rules import placement
from slimtune.technique import options_of

MiB = 2**20


@dataclass
class Plan:
    peak_memory_bytes: int
    phase: str  # the phase holding the peak
    breakdown: dict[str, int]  # component -> bytes at the peak (sums to peak_memory_bytes)
    phases: dict[str, int]  # every phase's predicted peak
    device: str
    world_size: int
    details: dict = field(default_factory=dict)  # the counts behind the components
    disk: dict = field(default_factory=dict)  # component -> bytes the run writes at most (plan/disk.py)

    def to_dict(self) -> dict:
        return {
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_phase": self.phase,
            "device": self.device,
            "world_size": self.world_size,
            "breakdown": self.breakdown,
            "phases": self.phases,
            "details": self.details,
            "disk_bytes": self.disk,
        }


def resolve_device(cfg) -> str:
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _weights(arch: Arch, cfg, cache: dict) -> Weights:
    from slimtune.formats.quantized import is_quantized_checkpoint, read_manifest
    from slimtune.registry import ADAPTERS, QUANT_FORMATS

    key = (
        "weights",
        arch.model_dir,
        cfg.model,
        cfg.adapter,
        cfg.quant,
        cfg.lq_lora,
        options_of(cfg, ADAPTERS.technique(cfg.adapter.type)),
        options_of(cfg, QUANT_FORMATS.technique(cfg.quant.method)),
    )
    if key not in cache:
        prebuilt = None
        if is_quantized_checkpoint(cfg.model.name):
            from pathlib import Path

            prebuilt = read_manifest(Path(cfg.model.name).expanduser())
        cache[key] = model_weights(arch, cfg, prebuilt)
    return cache[key]


def _format(cfg) -> str:
    q = cfg.quant
    if cfg.adapter.type == "none" or q.method == "none":
        return cfg.model.dtype
    if q.method == "lq_lora":
        return f"lq_lora@{cfg.lq_lora.budget_bits}b"
    return f"{q.method}-b{q.block_size}{'-dq' if q.double_quant else ''}" + (
        "-bnb" if q.backend == "bitsandbytes" else ""
    )


def _sizes(cfg, w: Weights, cache: dict) -> Sizes:
    o = cfg.optim
    key = ("sizes", id(w), o, options_of(cfg, OPTIMIZERS.get(o.name)))
    if key not in cache:
        grads = w.trainable_bytes
        if o.in_backward:  # each gradient is stepped and freed in backward: the largest one at a time
            grads = w.master * max((t.numel for t in w.trainable), default=0)
        cache[key] = Sizes(
            frozen=w.frozen_bytes + w.adapter_buffers + w.regrowth,
            trainable=w.trainable_bytes,
            grads=grads,
            state=state_bytes(cfg, w.trainable),
            step=step_transient_bytes(cfg, w.trainable),
        )
    return dataclasses.replace(cache[key])


def _data_bytes(cfg) -> int:
    """What the data pipeline keeps resident (data/splits.resident_bytes): its block and document indexes, not
    the tokens (pydoc's are part of the calibrated library figure)."""
    from slimtune.data.splits import resident_bytes

    return 0 if cfg.data.source == "pydoc" else resident_bytes(cfg.data.source, cfg.train.seq_len, cfg.data.packing)


def _train_steps(cfg, arch: Arch, w: Weights, s: Sizes, acts) -> dict[str, dict[str, int]]:
    """The train phase's sub-phases, each a dict of components live together."""
    t, o = cfg.train, cfg.optim
    full = cfg.adapter.type == "none"
    keep = {"optimizer.state": s.state}
    accumulated = s.grads if t.grad_accum > 1 else 0
    extra = {}
    if o.cram:  # a copy of every perturbed weight and of its clean gradient, between perturb and step
        extra["optimizer.cram"] = s.trainable + s.grads
    recompute = acts.layer if t.activation_checkpointing else 0
    saved = acts.saved
    forward = {
        **keep,
        **extra,
        "gradients": accumulated,
        "activations.saved": saved,
        "activations.loss": acts.loss_forward,
    }
    backward = {
        **keep,
        **extra,
        "gradients": accumulated,
        "activations.saved": saved,
        "activations.loss": acts.loss_backward,
        "activations.recompute": recompute,
        "activations.backward": acts.backward,
    }
    if o.in_backward:
        backward["optimizer.step"] = s.step
    embed_grad = w.master * arch.vocab * arch.hidden if full and not o.in_backward else 0
    end = {**keep, **extra, "gradients": s.grads, "activations.backward": acts.backward + embed_grad}
    step = {**keep, "gradients": s.grads, "optimizer.step": 0 if o.in_backward else s.step}
    if w.adapter_step:  # the adapters' own step-time memory (sparse_ft's dense gradient sums before a reselection)
        end["adapter.regrowth"] = step["adapter.regrowth"] = w.adapter_step
    return {"forward": forward, "backward": backward, "backward_end": end, "step": step}


def _fragmentation(cfg, arch: Arch, w: Weights, acts, device: str) -> int:
    """glibc's heap growth beyond the live bytes over a training step (platform.py), CPU only: a share of the
    heap-sized activations a step churns through and of the dense weights a quantized base dequantizes."""
    if device != "cpu" or offload_active(cfg):  # the offload engine fixes the mmap threshold
        return 0
    a = DTYPE_BYTES[cfg.model.dtype]
    dequant = sum(lin.numel * a for lin in arch.linears if lin.name in w.quantized and lin.numel * a < P.MMAP_MAX)
    f_act, f_deq = P.FRAGMENTATION[cfg.model.dtype]
    return int(f_act * acts.churn_heap + f_deq * dequant)


def _load_phases(cfg, arch: Arch, w: Weights, device: str) -> dict[str, dict[str, int]]:
    """Setup: the base loaded (and quantized / decomposed), before the engine takes it."""
    from slimtune.rules import load_dtype, needs_lowrank

    loaded = arch.numel * DTYPE_BYTES[load_dtype(cfg)] + arch.buffer_bytes
    if offload_active(cfg) and placement(cfg)[0] == "disk":  # streamed into the store unit by unit (pread)
        return {"load": {"weights.loading": _streamed_load_bytes(cfg, arch, w)}}
    load = {"weights.loading": loaded}
    if device == "cpu":
        load["load.file_pages"] = arch.file_bytes
    phases = {"load": load}
    if needs_lowrank(cfg):  # Fisher: a sum and a gradient per target (fp32); scoring: copies of one matrix
        targets = sum(lin.numel for lin in arch.linears if lin.name in w.quantized)
        largest = max((lin.numel for lin in arch.linears if lin.name in w.quantized), default=0)
        decompose = {"weights.loading": loaded, "load.transient": 3 * 4 * largest}
        if cfg.lq_lora.fisher:  # + one calibration sample's forward with every target weight requiring grad
            decompose["load.fisher"] = 8 * targets
            sample = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, batch_size=1, activation_checkpointing=False)
            )
            acts = activations(arch, sample, Weights(adapted={n: "train" for n in w.quantized}), device)
            decompose["load.fisher_activations"] = acts.saved + acts.loss_forward
            f_act, _ = P.FRAGMENTATION[cfg.model.dtype]
            decompose["allocator.fragmentation"] = int(f_act * acts.churn_heap)
        phases["load.decompose"] = decompose
    return phases


def _streamed_load_bytes(cfg, arch: Arch, w: Weights) -> int:
    """engines/offload/load.load_streamed: one unit's tensors converted (a decoder layer, or the embedding / head)
    while its largest tensor is read in the files' dtype, beside the buffers."""
    target = w.master if cfg.adapter.type == "none" else DTYPE_BYTES[cfg.model.dtype]
    layer = sum(p.numel for p in arch.params if p.layer == 0)
    root = [p.numel for p in arch.params if p.layer is None]
    largest = max([p.numel for p in arch.params], default=0)
    return target * max([layer, *root]) + arch.file_dtype_bytes * largest + arch.buffer_bytes


def resolve_dtype(cfg, device: str):
    """model.dtype=auto as the trainer resolves it for `device` (hardware.py); a concrete dtype as is."""
    if cfg.model.dtype in DTYPE_BYTES:
        return cfg
    from slimtune.hardware import resolve_dtype as resolve

    return resolve(cfg, device)[0]


def plan_memory(cfg, world_size: int = 1, device: str | None = None, cache: dict | None = None) -> Plan:
    """The predicted peak of a run of cfg (RecipeConfig) on each of world_size ranks. cache: a dict the caller
    keeps across calls on one model (plan --fit plans many configurations: weights and optimizer counts once)."""
    cache = {} if cache is None else cache
    device = device or resolve_device(cfg)
    cfg = resolve_dtype(cfg, device)
    arch = architecture(cfg.model.name)
    w = _weights(arch, cfg, cache)
    s = per_rank(cfg, arch, w, _sizes(cfg, w, cache), world_size, device)
    recompute = offload_recompute(cfg, arch, device)
    if recompute is not None:  # the offload engine's own recompute decision replaces activation checkpointing
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=recompute))
    acts = activations(arch, cfg, w, device)
    unsharded = w.frozen_bytes + w.adapter_buffers + w.regrowth
    quantized = round(s.frozen * sum(w.quantized.values()) / unsharded) if unsharded else 0
    resident = {
        "weights.quantized": quantized,
        "weights.frozen": s.frozen - quantized,
        "weights.trainable": s.trainable,
        "engine.buffers": s.engine,
        "offload.buffers": s.offload,
        "hooks.state": sum(HOOKS.get(n).state_bytes(options_of(cfg, HOOKS.get(n)), s.trainable) for n in cfg.hooks),
    }
    steps = _train_steps(cfg, arch, w, s, acts)
    name, top = max(steps.items(), key=lambda kv: sum(kv[1].values()))
    train = {**resident, **top}
    evaluate = {**resident, "optimizer.state": s.state, "activations.eval": acts.backward + acts.loss_forward}
    phases = {f"train.{name}": train, "eval": evaluate}
    if device == "cpu":  # on CUDA the base is loaded and quantized in host memory, then moved
        phases = {**_load_phases(cfg, arch, w, device), **phases}
    if cfg.adapter.type == "none":
        phases["save"] = {
            **resident,
            "optimizer.state": s.state,
            # final/: the whole model copied, or under the offload engine one unit at a time
            "save.copy": _streamed_load_bytes(cfg, arch, w)
            if offload_active(cfg)
            else arch.numel * DTYPE_BYTES[cfg.model.dtype],
        }
    platform = _platform(cfg, arch, device)
    if device == "cpu":
        frag = _fragmentation(cfg, arch, w, acts, device)
        for key in phases:  # the heap the training step grew stays for the rest of the run
            if not key.startswith("load"):
                phases[key]["runtime"] = P.RUNTIME_RSS
                phases[key]["allocator.fragmentation"] = frag
    else:  # the caching allocator's reserve above the allocated bytes
        for parts in phases.values():
            parts["allocator.reserve"] = int(P.CUDA_ALLOCATOR_SLACK * sum(parts.values()))
    totals = {k: sum(v.values()) + sum(platform.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    breakdown = {k: int(v) for k, v in {**platform, **phases[peak_phase]}.items() if v}
    details = {
        "model": str(arch.model_dir),
        "params": arch.numel,
        "dtype": cfg.model.dtype,
        "weights_format": _format(cfg),
        "trainable_params": sum(t.numel for t in w.trainable),
        "optimizer": cfg.optim.name,
        "tokens_per_micro_batch": cfg.train.batch_size * cfg.train.seq_len,
        "saved_activations": acts.saved,
        "engine": cfg.engine.name,
    }
    return Plan(
        sum(breakdown.values()),
        peak_phase,
        breakdown,
        {k: int(v) for k, v in totals.items()},
        device,
        world_size,
        details,
        disk_bytes(cfg, arch, w, world_size),
    )


def _platform(cfg, arch: Arch, device: str) -> dict[str, int]:
    if device != "cpu":
        return {"cuda_context": P.CUDA_CONTEXT}
    return {
        "libraries": P.library_rss(),
        "tokenizer": int(P.TOKENIZER_RSS_PER_BYTE * arch.tokenizer_bytes),
        "data": _data_bytes(cfg),
    }
