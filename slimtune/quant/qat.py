"""Quantization-aware training (qat.*): the linears train against the format final/ is converted to.

    qat.method=FORMAT      every linear but lm_head computes with its weight fake-quantized to FORMAT (any
                           quant.method format; block size and double quant from quant.*), straight-through
                           gradient (quant/fake.py); final/ is that format's quantized checkpoint
    qat.activations=int8   inputs fake-quantized per token too (torchao's 8da4w); the converted linears keep it
    qat.learn_scales=true  the block scales (and asymmetric zeros) train too (quant/learned_scales.py)
    qat.start_step=N       the first N steps train without fake quantization (torchao's fake-quant-after-N)
    qat.pv_tuning=true     PV-Tuning: codes of at most 3 bits updated as discrete variables (quant/pv_tuning.py)

Full fine-tuning (the `qat` recipe) fake-quantizes the trained weights. With LoRA (`qat_lora`) the base stays
frozen and full precision, and each wrapped linear computes with fake_quantize(W + scaling * B A): the
adapter trains against exactly the rounding its merge gets, so converting (merge, then quantize) changes
nothing the last step computed. A teacher for recover.kd / recover.feature defaults to model.name, the
model before fake quantization.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.hooks import Hooks
from slimtune.quant.fake import FakeQuantLinear, QuantFormatSpec
from slimtune.quant.linear import FrozenQuantLinear
from slimtune.quant.learned_scales import LEARNABLE_METHODS
from slimtune.quant.pv_tuning import PV_METHODS, PVTuning, check_pv_setting
from slimtune.registry import ADAPTERS, OPTIONS, QUANT_FORMATS
from slimtune.rules import placement
from slimtune.schema import config_section, option
from slimtune.technique import Technique, options_of

ADAPTERS_WITH_QAT = ("none", "lora")  # full fine-tuning, or LoRA trained against its merged quantization


@config_section("qat", fixed=True)
@dataclass(frozen=True)
class QATConfig:
    method: str = option(
        "none | the format the linears train against and final/ is converted to: nf4, int8, nf2, nf3, "
        "int2..int7, int2a..int8a (block size and double quant from quant.*), q8_0, q4_0, q4_1, q5_0, q5_1 "
        "(llama.cpp's block types, blocks of 32)",
        "none",
    )
    activations: str = option(
        "none | int8: dynamic per-token int8 inputs as well (torchao's 8da4w); the converted model keeps them",
        "none",
        ("none", "int8"),
    )
    learn_scales: bool = option(
        "train the block scales (and asymmetric zeros) too, through the rounding (LSQ / EfficientQAT); "
        "nf2, nf3, int2..int7, int2a..int8a",
        False,
    )
    start_step: int = option("steps trained before fake quantization switches on (0: from the first step)", 0)
    pv_tuning: bool = option(
        "PV-Tuning for codes of at most 3 bits (nf2, nf3, int2, int3, int2a, int3a): codes updated as discrete "
        "variables (the V step) beside the optimizer's step on scales and the rest (full fine-tuning, ddp)",
        False,
    )
    pv_fraction: float = option("PV-Tuning: at most this fraction of each matrix's codes change per step", 0.001)


@OPTIONS.register("qat.method")
class QuantizationAwareTraining(Technique):
    """qat.method=FORMAT: full-precision linears (no quant.method, no train.precision) swapped for fake-quantized
    ones; every linear's whole weight is quantized in its forward (FSDP2 and ZeRO-3 gather it per layer)."""

    section = "qat"

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.qat.method != "none"

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return (
            {"full_precision_linears", "trainable_base"} if cfg.adapter.type == "none" else {"full_precision_linears"}
        )

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        flags = {"full_precision_linears"}  # its linears are no longer plain (train.precision's swap)
        try:
            exact = getattr(format_spec(cfg).fmt, "exact_zero", False)  # a pruned base's zeros stay 0
        except (ValueError, ConfigError):
            exact = False
        return flags if exact else flags | {"exact_zero"}

    @classmethod
    def validate(cls, cfg) -> None:
        q = cfg.qat
        if q.method in ("none", "lq_lora") or q.method not in QUANT_FORMATS:
            formats = ", ".join(m for m in QUANT_FORMATS)
            raise ConfigError(f"qat.method={q.method!r} is not a quantized format; use one of {formats}")
        if cfg.quant.backend != "slimtune":
            raise ConfigError(
                f"qat.method={q.method} converts to slimtune's own formats, not quant.backend={cfg.quant.backend}: "
                "set quant.backend=slimtune"
            )
        if cfg.adapter.type not in ADAPTERS_WITH_QAT:
            raise ConfigError(
                f"qat.method={q.method} trains full fine-tuning or LoRA, not adapter.type={cfg.adapter.type}: "
                "set adapter.type=none or lora"
            )
        if cfg.adapter.type == "lora" and cfg.adapter.init != "default":
            raise ConfigError(
                f"qat.method={q.method} with LoRA starts from adapter.init=default, not {cfg.adapter.init}: "
                "set adapter.init=default"
            )
        if cfg.adapter.type == "lora" and cfg.lora.dropout > 0:
            raise ConfigError(
                f"qat.method={q.method} with LoRA quantizes W + B A as one weight, which leaves no input for "
                f"lora.dropout={cfg.lora.dropout}: set lora.dropout=0"
            )
        if not 0 <= q.start_step < cfg.train.max_steps:
            raise ConfigError(
                f"qat.start_step={q.start_step} must be in [0, train.max_steps={cfg.train.max_steps}): the "
                "last steps must train against the quantization"
            )
        if q.learn_scales and q.method not in LEARNABLE_METHODS:
            raise ConfigError(
                "qat.learn_scales=true needs a format that stores plain block scales "
                f"({', '.join(LEARNABLE_METHODS)}), not qat.method={q.method}: change one of qat.learn_scales and "
                "qat.method"
            )
        if q.learn_scales and cfg.engine.name == "offload" and "disk" in placement(cfg):
            _validate_offloaded_scales(cfg)
        try:
            QuantFormatSpec(q.method, cfg.quant.block_size, cfg.quant.double_quant, format_options(cfg))
        except ValueError as e:
            raise ConfigError(f"qat.method={q.method} quant.block_size={cfg.quant.block_size}: {e}") from None


def _validate_offloaded_scales(cfg) -> None:
    if placement(cfg)[0] == "disk":
        raise ConfigError(
            "qat.learn_scales=true starts each block's scale from its weights, which engine.params=disk keeps in "
            "the store until they stream: set engine.params=none (optimizer state alone on disk) or "
            "qat.learn_scales=false"
        )
    if cfg.qat.start_step:
        raise ConfigError(
            f"qat.learn_scales=true with qat.start_step={cfg.qat.start_step}: the scales get no gradient before "
            "that step, and engine.name=offload updates a layer once every parameter's gradient arrived: set "
            "qat.start_step=0 or another engine.name"
        )


@OPTIONS.register("qat.pv_tuning")
class QATPVTuning(Technique):
    """qat.pv_tuning=true: PV-Tuning (quant/pv_tuning.py) of a full fine-tuning's <= 3-bit codes; without
    qat.method it would do nothing, so it is refused then too."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.qat.pv_tuning

    @classmethod
    def validate(cls, cfg) -> None:
        _validate_pv(cfg)


def _validate_pv(cfg) -> None:
    q = cfg.qat
    if q.method not in PV_METHODS:
        raise ConfigError(
            f"qat.pv_tuning=true is for codes of at most 3 bits ({', '.join(PV_METHODS)}), not qat.method={q.method}: "
            "change one of qat.pv_tuning and qat.method"
        )
    settings = (
        ("adapter.type", cfg.adapter.type, "none"),
        ("engine.name", cfg.engine.name, "ddp"),
        ("optim.in_backward", cfg.optim.in_backward, False),
        ("qat.start_step", q.start_step, 0),
    )
    check_pv_setting("qat.pv_tuning", "fully fine-tuned weights", settings, "qat.pv_fraction", q.pv_fraction)


def format_options(cfg):
    """The qat format's own config section (when it declares one)."""
    return options_of(cfg, QUANT_FORMATS.get(cfg.qat.method))


def format_spec(cfg) -> QuantFormatSpec:
    return QuantFormatSpec(cfg.qat.method, cfg.quant.block_size, cfg.quant.double_quant, format_options(cfg))


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def apply_qat(model: nn.Module, cfg, skip: frozenset = frozenset()) -> int:
    """Swap, in place, every nn.Linear of `model` but lm_head (and the modules whose ids are in `skip`: an
    adapter's own factors) for a FakeQuantLinear sharing its parameters. A linear that is a LoRA adapter's base
    quantizes W + the adapter's update, and the adapter stops adding its own output. Returns how many."""
    spec, q = format_spec(cfg), cfg.qat
    parents = {id(m.base): m for m in model.modules() if hasattr(m, "delta_weight") and hasattr(m, "base")}
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] != "lm_head" and id(m) not in skip
    ]
    for name, linear in targets:
        owner = parents.get(id(linear))
        try:
            spec.fmt.check_shape((linear.out_features, linear.in_features))
        except ValueError as e:
            raise ConfigError(
                f"qat.method={cfg.qat.method} cannot hold {name}'s weights ({e}); pick a block size (quant.block_size) "
                "that divides them, or another qat.method"
            ) from None
        delta = owner.delta_weight if owner is not None else None
        fake = FakeQuantLinear.from_linear(linear, spec, q.activations, delta, q.learn_scales, q.pv_tuning)
        if owner is not None:
            owner.delta_in_base = True
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fake)
    return len(targets)


class StartStep(Hooks):
    """qat.start_step: fake quantization on from that step (a function of the step alone: resumes exactly)."""

    def __init__(self, modules: list[FakeQuantLinear], start_step: int):
        self.modules, self.start = modules, start_step
        self._set(0)

    def _set(self, step: int) -> None:
        for m in self.modules:
            m.enabled = step >= self.start

    def on_load(self, path, step: int) -> None:
        self._set(step)

    def after_step(self, model, optimizer, step: int) -> None:
        self._set(step)


def qat_hooks(model: nn.Module, cfg) -> list[Hooks]:
    q, modules = cfg.qat, list(fake_quant_modules(model).values())
    hooks = [StartStep(modules, q.start_step)] if q.start_step else []
    return hooks + ([PVTuning(modules, q.pv_fraction)] if q.pv_tuning else [])


@torch.no_grad()
def quantized_module(fake: FakeQuantLinear, compute_dtype: torch.dtype) -> nn.Module:
    """The frozen quantized linear of `fake`'s effective weight (the adapter's update merged, coded against the
    learned scales when it has them): its forward is fake's forward, bit for bit in fp32."""
    real = fake.spec.cls.make(
        fake.spec.fmt, fake.in_features, fake.out_features, False, compute_dtype, fake.weight.device
    )
    real.set_weight(fake.packed())
    real.set_bias(fake.bias)
    real.activations = fake.activations
    return real


def swap_quantized(model: nn.Module, fakes: dict[str, FakeQuantLinear], compute_dtype: torch.dtype) -> list:
    """Replace each of `fakes` (name -> module of `model`; the LoRA adapter around it too) by its quantized linear,
    built from the weights it holds now. Returns what `put_back` needs to undo it."""
    swaps = []
    for name, fake in fakes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if getattr(parent, "delta_in_base", False):  # the LoRA wrapper goes too: its update is merged
            parent_name, _, child = parent_name.rpartition(".")
            parent, old = model.get_submodule(parent_name), parent
        else:
            old = fake
        swaps.append((parent, child, old))
        setattr(parent, child, quantized_module(fake, compute_dtype))
    return swaps


def put_back(swaps: list) -> None:
    for parent, child, old in swaps:
        setattr(parent, child, old)


@contextlib.contextmanager
def converted(model: nn.Module, compute_dtype: torch.dtype):
    """`model` with every FakeQuantLinear (and the LoRA adapter around it) replaced by its quantized linear for
    the duration of the block; the training modules are put back afterwards."""
    swaps = swap_quantized(model, fake_quant_modules(model), compute_dtype)
    # the rest (embeddings, norms, lm_head) in the compute dtype, as `slimtune quantize` stores it (bf16 masters);
    # LoRA factors kept beside a quantized base (LQ-LoRA) stay the fp32 masters they are
    adapters = [m for m in model.modules() if isinstance(m, tuple(ADAPTERS.values()))]
    factors = {id(p) for a in adapters for n, p in a.named_parameters() if "base." not in n}
    cast = [p for m in model.modules() if not isinstance(m, FrozenQuantLinear) for p in m.parameters(recurse=False)]
    cast = [(p, p.data) for p in cast if p.is_floating_point() and p.dtype != compute_dtype and id(p) not in factors]
    for p, data in cast:
        p.data = data.to(compute_dtype)
    try:
        yield model
    finally:
        for p, data in cast:
            p.data = data
        put_back(swaps)
