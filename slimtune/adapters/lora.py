"""LoRA (Hu et al. 2021): y = base(x) + (alpha / r) * B(A(dropout(x))); rsLoRA (Kalajdzievski 2023) scales
by alpha / sqrt(r) instead.

`LoRALinear` wraps any linear-like module kept as `self.base` (nn.Linear, slimtune NF4/INT8, bnb
Linear4bit/Linear8bitLt), frozen and never copied. A gets PEFT's Kaiming-uniform init and B starts
at zero, so at init the wrapped model's output equals the base model's. Parameter names `lora_A.weight`
/ `lora_B.weight` match PEFT's, which keeps the PEFT checkpoint mapping a pure rename.

On a pruned base (`set_weight_mask`) the update is mask * (B A): pruned weights stay 0 when the adapter is
merged, so the forward computes the masked (out, in) delta instead of the low-rank product (PEFT has no
such mode; the mask comes back from the base's zeros whenever the adapter is loaded onto it).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimtune.adapters.base import AdapterDefaults, AdapterTerms
from slimtune.errors import ConfigError
from slimtune.quant import is_quantized_linear
from slimtune.registry import ADAPTER_INITS, ADAPTERS, OPTIONS
from slimtune.technique import Technique
from slimtune.schema import config_section, option


@config_section("lora", fixed=True)
@dataclass(frozen=True)
class LoRAConfig:
    """The LoRA family's options (adapter.type=lora | dora | lq_lora, and the LoftQ / EoRA / PiSSA inits)."""

    rank: int = option("LoRA rank r", 16)
    alpha: float = option("LoRA scaling numerator: delta = alpha/r * B A", 32.0)
    use_rslora: bool = option("rsLoRA: scale by alpha/sqrt(r) instead of alpha/r", False)
    dropout: float = option("dropout on the LoRA input", 0.0)


@ADAPTERS.register("lora")
class LoRALinear(AdapterDefaults, nn.Module):
    format = "peft"  # saved in PEFT's format (formats/peft.py)
    section = "lora"
    plan_dropout = True

    @classmethod
    def memory_terms(
        cls, options: LoRAConfig, out_features: int, in_features: int, share: float, max_steps: int
    ) -> AdapterTerms:
        return dataclasses.replace(
            super().memory_terms(options, out_features, in_features, share, max_steps), width=options.rank
        )

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.lora
        if o.rank <= 0:
            raise ConfigError(f"lora.rank={o.rank} must be > 0")
        if o.alpha <= 0:
            raise ConfigError(f"lora.alpha={o.alpha} must be > 0")
        if not 0 <= o.dropout < 1:
            raise ConfigError(f"lora.dropout={o.dropout} must be in [0, 1)")

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        in_f, out_f = base.in_features, base.out_features
        if rank > min(in_f, out_f):
            raise ValueError(f"LoRA rank {rank} exceeds min(in_features={in_f}, out_features={out_f})")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Trainable factors are fp32 whatever the base dtype: they are the master weights.
        self.lora_A = nn.Linear(in_f, rank, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_f, bias=False, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.delta_in_base = False  # QAT (quant/qat.py): the base quantizes W + delta itself
        self.register_buffer("weight_mask", None, persistent=False)  # set_weight_mask on a pruned base

    def set_weight_mask(self, mask: torch.Tensor) -> None:
        """Hold the base's sparsity: the update becomes mask * delta (mask: (out, in) bool, True = kept)."""
        if getattr(self, "pissa_A0", None) is not None:  # its residual base is dense, B0 A0 would be masked
            raise ConfigError(
                "adapter.init=pissa on a pruned base would make the pruned weights nonzero; use adapter.init=default"
            )
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight mask {tuple(mask.shape)} does not match ({self.out_features}, {self.in_features})"
            )
        self.weight_mask = mask.to(device=self.lora_A.weight.device, dtype=torch.bool)

    @classmethod
    def from_config(
        cls, base: nn.Module, options: LoRAConfig, name: str | None = None, init: str = "default"
    ) -> "LoRALinear":
        """options: the lora section (rank, alpha, dropout, use_rslora); init: adapter.init, whose `wrap` (if it
        has one: PiSSA) runs on each module as it is wrapped."""
        m = cls(base, options.rank, options.alpha, options.dropout, use_rslora=options.use_rslora)
        wrap = getattr(ADAPTER_INITS.technique(init), "wrap", None)  # PiSSA on a plain base: as each is wrapped
        if wrap is not None:
            wrap(m, options, name)
        return m

    @classmethod
    def configure(cls, model: nn.Module, names: list[str], options: LoRAConfig) -> LoRAConfig:
        for n in names:
            m = model.get_submodule(n)
            if options.rank > min(m.in_features, m.out_features):
                raise ConfigError(
                    f"lora.rank={options.rank} exceeds min(in, out)="
                    f"{min(m.in_features, m.out_features)} of {n}; use a smaller rank"
                )
        return options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in the base output's dtype."""
        y = self.base(x)
        if self.merged or self.delta_in_base:
            return y
        # under autocast the factors run in the autocast dtype; otherwise in fp32. Under autocast x goes in as
        # it is: an fp32 copy would be cast back per adapter, and q/k/v (gate/up) would each save their own copy
        if not (torch.is_autocast_enabled(x.device.type) and isinstance(self.dropout, nn.Identity)):
            x = self.dropout(x.to(self.lora_A.weight.dtype))
        return y + self.lora_output(x).to(y.dtype)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A x (x: the dropped-out input in the factors' dtype); mask * (B A) on a pruned base."""
        if self.weight_mask is not None:
            w = (self.lora_B.weight @ self.lora_A.weight) * self.weight_mask
            return nn.functional.linear(x, w) * self.scaling
        return self.lora_B(self.lora_A(x)) * self.scaling

    @torch.no_grad()
    def init_factors(self, L1: torch.Tensor, L2: torch.Tensor) -> None:
        """Start from delta = L1 @ L2 (L1: (out, r), L2: (r, in)); the scaling is divided out of B.
        Used by LQ-LoRA / LoftQ / EoRA, whose factors carry part of the weight from step 0."""
        self.lora_A.weight.copy_(L2)
        self.lora_B.weight.copy_(L1 / self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: scaling * B @ A (times the weight mask on a pruned base)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta if self.weight_mask is None else delta * self.weight_mask

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Add the delta into the base weight. A slimtune quantized base is re-quantized (lossy, explicit)
        and its codes before the merge are kept, so unmerge() restores them exactly; bitsandbytes bases
        cannot be merged in place (export merges into a full-precision base). safe: raise, unmerged, if
        the merged weight would not be finite."""
        if self.merged:
            raise RuntimeError("LoRA adapter is already merged; unmerge() first")
        base = self.base
        if hasattr(base, "requantize_"):  # slimtune's formats
            new = base.dequantize_weight(torch.float32)
            new += self.delta_weight().to(new.device)
        elif isinstance(base, nn.Linear) and not is_quantized_linear(base):  # (bnb's layers subclass nn.Linear)
            new = base.weight.float() + self.delta_weight().to(base.weight.device)
        else:
            raise NotImplementedError(
                f"cannot merge LoRA into {type(base).__name__} in place; export with "
                "`slimtune export RUN_DIR --merge`, which merges into the full-precision base"
            )
        if safe and not torch.isfinite(new).all():
            raise ValueError("merging this LoRA adapter gives non-finite weights; not merged")
        if hasattr(base, "requantize_"):
            self._codes_before_merge = base._packed()  # a view of the current buffers: requantize_ replaces them
            base.requantize_(new)
        else:
            base.weight.copy_(new.to(base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): subtract the delta from a plain base; give a quantized base back its exact codes."""
        if not self.merged:
            raise RuntimeError("LoRA adapter is not merged")
        if hasattr(self.base, "requantize_"):
            self.base.set_weight(self._codes_before_merge)
            del self._codes_before_merge
        else:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, rslora={self.use_rslora}, merged={self.merged}"


@OPTIONS.register("lora.use_rslora")
class RsLoRA(Technique):
    """lora.use_rslora=true: scales LoRA factors, so it needs some."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.lora.use_rslora

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"lora_factors"}
