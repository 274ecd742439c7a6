"""Bytes of the model as a run holds it: the frozen base by storage format, and the trainable tensors.

The counts follow what the code allocates: `quant/` formats store codes + scales exactly as each format
class's `tensor_layout` (NF4, NF-k, INT-k, double-quantized scales; INT8's fp32 absmax) lays them out,
bitsandbytes' layers as its backend declares; what stays unquantized (embeddings, norms, lm_head) is cast to
model.dtype (model/quantize.quantize_base); trainable tensors are fp32 master weights (adapters/inject.apply_adapters,
LoRA factors, sparse_ft deltas). LQ-LoRA's per-matrix formats come from an integer program at plan time
unknown: its base is counted at lq_lora.budget_bits, the average the allocation must meet.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from slimtune.plan.arch import Arch, Linear
from slimtune.quant.linear import configured_format
from slimtune.quant.scales import DQ_BLOCK
from slimtune.registry import ADAPTERS, BACKENDS, QUANT_FORMATS
from slimtune.technique import options_of

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Tensor:
    """A trainable tensor: qualified name (the optimizer's lowrank grouping reads the module name) and shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Weights:
    frozen_bytes: int = 0  # frozen base: quantized codes + scales, unquantized params in model.dtype, buffers
    quantized: dict[str, int] = field(default_factory=dict)  # quantized linear -> its stored bytes
    trainable: list[Tensor] = field(default_factory=list)  # master weights / adapter factors
    master: int = 4  # bytes per trainable value: fp32, or bf16 with optim.master_dtype=bfloat16
    adapter_buffers: int = 0  # non-trainable adapter tensors: sparse_ft's indices (int64)
    regrowth: int = 0  # adapter statistics allocated when training starts (sparse_ft's SM3 row + column sums)
    adapter_step: int = 0  # held around some optimizer steps (sparse_ft's dense gradient sums)
    adapted: dict[str, str] = field(default_factory=dict)  # module name -> its plan_kind ("lora" | "sparse") | "train"
    adapter_width: int = 0  # values per token an adapter's forward saves besides its input (AdapterTerms.width)
    adapter_dropout: bool = False  # the adapters save a dropped-out copy of their input (plan_dropout, dropout > 0)

    @property
    def trainable_bytes(self) -> int:
        return self.master * sum(t.numel for t in self.trainable)

    def heap_trainable_bytes(self, limit: int) -> int:
        """Bytes of the trainable tensors smaller than `limit` bytes each (their gradients' heap share)."""
        return self.master * sum(t.numel for t in self.trainable if self.master * t.numel < limit)


def stored_bytes(lin: Linear, cls, fmt, dtype_bytes: int) -> int:
    """Bytes of one frozen linear stored by quantized-format class `cls` in format `fmt` (its tensor layout:
    codes + scales; its bias in model.dtype)."""
    layout = cls.tensor_layout(fmt, (lin.out_features, lin.in_features))
    bias = lin.out_features * dtype_bytes if lin.bias else 0
    # double-quantized int8 scales keep the storage of their padded (256-value) blocks (scales.double_quantize)
    return (
        sum(
            (-(-count // DQ_BLOCK) * DQ_BLOCK if key.endswith("_q") else count) * dt.itemsize
            for key, (count, dt) in layout.items()
        )
        + bias
    )


def linear_storage_bytes(lin: Linear, cfg, dtype_bytes: int) -> int:
    """Bytes of one frozen linear quantized per cfg.quant (and the format's own section)."""
    q = cfg.quant
    if q.backend == "bitsandbytes":
        return BACKENDS.get("bitsandbytes").storage_bytes(q, lin.numel, lin.out_features) + (
            lin.out_features * dtype_bytes if lin.bias else 0
        )
    cls = QUANT_FORMATS.get(q.method)
    fmt = configured_format(cls, q.method, q.block_size, q.double_quant, options_of(cfg, cls))
    return stored_bytes(lin, cls, fmt, dtype_bytes)


def target_linears(arch: Arch, cfg) -> list[Linear]:
    """The linears adapter.target_modules selects (all-linear: every linear but lm_head), as apply_adapters."""
    from slimtune.adapters.inject import target_names

    names = set(target_names(arch.model, cfg.adapter.target_modules))
    return [lin for lin in arch.linears if lin.name in names]


def model_weights(arch: Arch, cfg, prebuilt: dict | None = None) -> Weights:
    """The frozen and trainable tensors of cfg's model after setup (pipeline stages 1-3).
    prebuilt: a quantized checkpoint's manifest (its formats and adapters replace cfg.quant / cfg.adapter)."""
    a, q = cfg.adapter, cfg.quant
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    w = Weights()
    if a.type == "none":  # full fine-tuning: every parameter a master weight (buffers stay frozen)
        w.master = DTYPE_BYTES[cfg.optim.master_dtype]
        w.frozen_bytes = arch.buffer_bytes
        w.trainable = [Tensor(p.name, p.shape) for p in arch.params]
        w.adapted = {lin.name: "train" for lin in arch.linears}
        return w
    targets = target_linears(arch, cfg)
    quantized: dict[str, int] = {}  # linear -> stored bytes
    if prebuilt is not None:
        for name, spec in prebuilt.get("quantized", {}).items():
            lin = next((x for x in arch.linears if x.name == name), None)
            if lin is not None:
                cls = next(c for c in QUANT_FORMATS.values() if c.__name__ == spec["class"])
                quantized[name] = stored_bytes(lin, cls, cls.format_for(spec["format"]), dtype_bytes)
        ranks = {n: spec["rank"] for n, spec in prebuilt.get("adapters", {}).items()}
    else:
        ranks = {}
        if q.method == "lq_lora":  # the targets' Q at the budget's average bits per value
            for lin in targets:
                quantized[lin.name] = math.ceil(cfg.lq_lora.budget_bits * lin.numel / 8) + (
                    lin.out_features * dtype_bytes if lin.bias else 0
                )
        elif q.method != "none":
            # uniform formats swap every nn.Linear but lm_head; LoftQ / EoRA (adapter.init) the targets only
            chosen = targets if a.init != "default" else [x for x in arch.linears if x.role != "lm_head"]
            for lin in chosen:
                quantized[lin.name] = linear_storage_bytes(lin, cfg, dtype_bytes)
    w.quantized = quantized
    in_quantized = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    w.frozen_bytes = (
        arch.buffer_bytes
        + sum(quantized.values())
        + sum(p.numel * dtype_bytes for p in arch.params if p.name not in in_quantized)
    )
    adapter = ADAPTERS.get(a.type)
    options = options_of(cfg, adapter)
    w.adapter_dropout = adapter.plan_dropout and getattr(options, "dropout", 0) > 0
    total_target = sum(lin.numel for lin in targets)
    for lin in targets if not ranks else [x for x in arch.linears if x.name in ranks]:
        own = dataclasses.replace(options, rank=ranks[lin.name]) if lin.name in ranks else options
        terms = adapter.memory_terms(
            own, lin.out_features, lin.in_features, lin.numel / max(total_target, 1), cfg.train.max_steps
        )
        w.trainable += [Tensor(f"{lin.name}.{n}", shape) for n, shape in terms.trainable]
        w.adapter_buffers += terms.buffer_bytes
        w.regrowth += terms.state_bytes
        w.adapter_step += terms.step_bytes
        w.adapter_width = max(w.adapter_width, terms.width)
        w.adapted[lin.name] = adapter.plan_kind
    return w


def layer_param_bytes(arch: Arch, weights: Weights, dtype_bytes: int) -> int:
    """Bytes of one decoder layer's parameters as stored (quantized codes or model.dtype), for the unsharded
    layer of FSDP2 / ZeRO-3 and for the offload engine's layer slabs."""
    stored = {f"{n}.{p}" for n in weights.quantized for p in ("weight", "bias")}
    total = sum(weights.quantized.get(lin.name, 0) for lin in arch.layer_linears(0).values())
    total += sum(p.numel * dtype_bytes for p in arch.params if p.layer == 0 and p.name not in stored)
    return total
