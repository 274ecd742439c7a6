"""Bytes of the model as a run holds it: the frozen base by storage format, and the trainable tensors.

The counts follow what the code allocates: `quant/` formats store codes + scales exactly as
`QuantFormat.tensor_layout` (NF4, NF-k, INT-k, double-quantized scales) or `Int8Weight` (int8 codes + fp32
absmax) lay them out; what stays unquantized (embeddings, norms, lm_head) is cast to model.dtype
(model/quantize.quantize_base); trainable tensors are fp32 master weights (adapters/inject.apply_adapters,
LoRA factors, sparse_ft deltas). LQ-LoRA's per-matrix formats come from an integer program at plan time
unknown: its base is counted at lq_lora.budget_bits, the average the allocation must meet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from slimtune.plan.arch import Arch, Linear
from slimtune.quant.scales import DQ_BLOCK

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
    trainable: list[Tensor] = field(default_factory=list)  # fp32 master weights / adapter factors
    adapter_buffers: int = 0  # non-trainable adapter tensors: sparse_ft's indices (int64)
    regrowth: int = 0  # sparse_ft's regrowth statistics, allocated when training starts (SM3 row + column sums)
    adapted: dict[str, str] = field(default_factory=dict)  # module name -> "lora" | "sparse" | "train"

    @property
    def trainable_bytes(self) -> int:
        return 4 * sum(t.numel for t in self.trainable)

    def heap_trainable_bytes(self, limit: int) -> int:
        """fp32 bytes of the trainable tensors smaller than `limit` bytes each (their gradients' heap share)."""
        return 4 * sum(t.numel for t in self.trainable if 4 * t.numel < limit)


def linear_storage_bytes(lin: Linear, method: str, block_size: int, double_quant: bool, backend: str,
                         dtype_bytes: int) -> int:
    """Bytes of one frozen linear quantized with quant.method (codes + scales; its bias in model.dtype)."""
    from slimtune.quant import QUANT_FORMATS

    n, bias = lin.numel, lin.out_features * dtype_bytes if lin.bias else 0
    nb = -(-n // block_size)
    if backend == "bitsandbytes":  # Linear4bit: packed codes + absmax (uint8 + fp32 per 256 nested);
        if method == "nf4":        # Linear8bitLt: int8 codes + one fp32 scale per row
            return n // 2 + (nb + 4 * (-(-nb // 256) + 1) if double_quant else 4 * nb) + bias
        return n + 4 * lin.out_features + bias
    fmt = QUANT_FORMATS.get(method).format_for(method, block_size, double_quant)
    if (fmt.kind, fmt.bits) == ("int", 8):  # Int8Weight keeps fp32 scales (quant.double_quant does not apply)
        return n + 4 * nb + bias
    layout = fmt.tensor_layout((lin.out_features, lin.in_features))
    # double-quantized int8 scales keep the storage of their padded (256-value) blocks (scales.double_quantize)
    return sum((-(-count // DQ_BLOCK) * DQ_BLOCK if key.endswith("_q") else count) * dt.itemsize
               for key, (count, dt) in layout.items()) + bias


def _sparse_k(lin: Linear, adapter, total_numel: int) -> int:
    """sparse_ft entries of one target: round(density * numel), or num_params spread by size."""
    if adapter.num_params:
        return max(1, round(adapter.num_params * lin.numel / total_numel))
    return max(1, round(adapter.density * lin.numel))


def target_linears(arch: Arch, cfg) -> list[Linear]:
    """The linears adapter.target_modules selects (all-linear: every linear but lm_head), as apply_adapters."""
    from slimtune.adapters.inject import target_names

    names = set(target_names(arch.model, cfg.adapter.target_modules))
    return [lin for lin in arch.linears if lin.name in names]


def model_weights(arch: Arch, cfg, prebuilt: dict | None = None) -> Weights:
    """The frozen and trainable tensors of cfg's model after setup (pipeline stages 1-3).
    prebuilt: a quantized checkpoint's manifest (its formats and adapters replace cfg.quant / cfg.adapter)."""
    from slimtune.quant import QuantFormat

    a, q = cfg.adapter, cfg.quant
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    w = Weights()
    if a.type == "none":  # full fine-tuning: every parameter an fp32 master weight (buffers stay frozen)
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
                fmt = QuantFormat.parse(spec["format"])
                method = f"{'nf' if fmt.kind == 'nf' else 'int'}{fmt.bits}{'a' if fmt.kind == 'int_asym' else ''}"
                quantized[name] = linear_storage_bytes(lin, method, fmt.block_size, fmt.double_quant, "slimtune",
                                                       dtype_bytes)
        ranks = {n: spec["rank"] for n, spec in prebuilt.get("adapters", {}).items()}
    else:
        ranks = {}
        if q.method == "lq_lora":  # the targets' Q at the budget's average bits per value
            for lin in targets:
                quantized[lin.name] = math.ceil(cfg.lq_lora.budget_bits * lin.numel / 8) + (
                    lin.out_features * dtype_bytes if lin.bias else 0)
        elif q.method != "none":
            # uniform formats swap every nn.Linear but lm_head; LoftQ / EoRA (adapter.init) the targets only
            chosen = targets if a.init != "default" else [x for x in arch.linears if x.role != "lm_head"]
            for lin in chosen:
                quantized[lin.name] = linear_storage_bytes(lin, q.method, q.block_size, q.double_quant, q.backend,
                                                           dtype_bytes)
    w.quantized = quantized
    in_quantized = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    w.frozen_bytes = arch.buffer_bytes + sum(quantized.values()) + sum(
        p.numel * dtype_bytes for p in arch.params if p.name not in in_quantized)
    total_target = sum(lin.numel for lin in targets)
    for lin in targets if not ranks else [x for x in arch.linears if x.name in ranks]:
        if a.type == "sparse_ft":
            k = _sparse_k(lin, a, total_target)
            w.trainable.append(Tensor(f"{lin.name}.deltas", (k,)))
            # indices int64; regrowth: SM3 row + column sums (ma), or a dense fp32 gradient sum (ag, transient)
            w.adapter_buffers += 8 * k
            w.regrowth += 4 * (lin.in_features + lin.out_features) if cfg.sparse_ft.regrow == "ma" else 0
            w.adapted[lin.name] = "sparse"
        else:
            r = ranks.get(lin.name, a.rank)
            w.trainable += [Tensor(f"{lin.name}.lora_A.weight", (r, lin.in_features)),
                            Tensor(f"{lin.name}.lora_B.weight", (lin.out_features, r))]
            w.adapted[lin.name] = "lora"
    return w


def layer_param_bytes(arch: Arch, weights: Weights, dtype_bytes: int) -> int:
    """Bytes of one decoder layer's parameters as stored (quantized codes or model.dtype), for the unsharded
    layer of FSDP2 / ZeRO-3 and for the offload engine's layer slabs."""
    stored = {f"{n}.{p}" for n in weights.quantized for p in ("weight", "bias")}
    total = sum(weights.quantized.get(lin.name, 0) for lin in arch.layer_linears(0).values())
    total += sum(p.numel * dtype_bytes for p in arch.params if p.layer == 0 and p.name not in stored)
    return total
