"""The config's rules that belong to no single technique: the core sections' values, the trainer's own
switches (clipping, gradient accumulation) as techniques, and the small questions every stage asks of a config
(where an engine keeps state, whether the base is decomposed, the dtype to load it in).

A technique's own rules live in its file (its `validate`); which options combine is technique.py's one rule
over the flags each declares. config.validate runs all three before anything loads.
"""

from __future__ import annotations

from slimtune.errors import ConfigError
from slimtune.registry import ADAPTER_INITS, OPTIONS
from slimtune.technique import Technique


def validate_core(cfg) -> None:
    """Values of the core sections (schema.py) that a type and a choice list cannot express."""
    t, d, o, p, r = cfg.train, cfg.data, cfg.optim, cfg.prune, cfg.recover
    for key, value in (
        ("train.max_steps", t.max_steps),
        ("train.seq_len", t.seq_len),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("quant.block_size", cfg.quant.block_size),
        ("checkpoint.keep", cfg.checkpoint.keep),
    ):
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    for key, value in (
        ("train.warmup_steps", t.warmup_steps),
        ("train.epochs", t.epochs),
        ("train.loss_chunk_tokens", t.loss_chunk_tokens),
        ("checkpoint.every", cfg.checkpoint.every),
        ("eval.every", cfg.eval.every),
        ("eval.max_batches", cfg.eval.max_batches),
        ("train.max_grad_norm", t.max_grad_norm),
        ("optim.weight_decay", o.weight_decay),
        ("optim.lora_plus_ratio", o.lora_plus_ratio),
    ):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0 < t.lr:
        raise ConfigError(f"train.lr={t.lr} must be > 0")
    for i, part in enumerate(d.sources):
        if not isinstance(part, dict) or set(part) - {"source", "weight"} or not isinstance(part.get("source"), str):
            raise ConfigError(f"data.sources[{i}]={part!r}: each entry is {{source: PATH or pydoc, weight: NUMBER}}")
        weight = part.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.sources[{i}].weight={weight!r} must be a number > 0")
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in (0, 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    tm = cfg.adapter.target_modules
    if isinstance(tm, str) and tm != "all-linear":
        raise ConfigError(f"adapter.target_modules={tm!r}: give a list like [q_proj, v_proj] or all-linear")
    if isinstance(tm, tuple) and (not tm or not all(isinstance(t, str) for t in tm)):
        raise ConfigError("adapter.target_modules: give a non-empty list of module names or all-linear")
    if not 0 < p.sparsity < 1:
        raise ConfigError(f"prune.sparsity={p.sparsity} must be in (0, 1)")
    if p.calibration_samples < 1:
        raise ConfigError(f"prune.calibration_samples={p.calibration_samples} must be >= 1")
    for key in ("ce", "kd", "feature"):
        if getattr(r, key) < 0:
            raise ConfigError(f"recover.{key}={getattr(r, key)} must be >= 0")
    if r.ce + r.kd + r.feature == 0:
        raise ConfigError("recover.ce, recover.kd and recover.feature are all 0: give at least one a weight")
    if r.temperature <= 0:
        raise ConfigError(f"recover.temperature={r.temperature} must be > 0")
    if not 0 < d.select_fraction <= 1:
        raise ConfigError(f"data.select_fraction={d.select_fraction} must be in (0, 1]")


@OPTIONS.register("train.max_grad_norm")
class Clipping(Technique):
    """train.max_grad_norm > 0: the global gradient norm is clipped before each step."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.train.max_grad_norm > 0

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"clippable"}


@OPTIONS.register("train.grad_accum")
class Accumulation(Technique):
    """train.grad_accum > 1: gradients add up over micro-steps before each step."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.train.grad_accum > 1

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"accumulation"}


def placement(cfg) -> tuple[str, str]:
    """(engine.params, engine.optimizer) with auto resolved: disk for engine.name=offload, else none."""
    e = cfg.engine
    default = "disk" if e.name == "offload" else "none"
    return (default if e.params == "auto" else e.params), (default if e.optimizer == "auto" else e.optimizer)


def needs_lowrank(cfg) -> bool:
    """True when the base is quantized together with its low-rank factors (from the full-precision W). An
    adapter.init with a `wrap` (PiSSA) on a plain base is not: it runs as each module is wrapped (LoRALinear.
    from_config) and the run is saved as a PEFT adapter."""
    wraps = getattr(ADAPTER_INITS.technique(cfg.adapter.init), "wrap", None) is not None
    return cfg.quant.method == "lq_lora" or (
        cfg.adapter.init != "default" and not (wraps and cfg.quant.method == "none")
    )


def load_dtype(cfg) -> str:
    """The dtype to load the base in: bf16 when a uniform quantization follows (the full-precision copy then
    never exists in fp32: lower peak memory); optim.master_dtype for full fine-tuning (fp32 master weights are the
    file's values, not their bf16 rounding); else model.dtype (a decomposition needs the exact weights)."""
    if cfg.quant.method != "none" and not needs_lowrank(cfg):
        return "bfloat16"
    return cfg.optim.master_dtype if cfg.adapter.type == "none" else cfg.model.dtype
