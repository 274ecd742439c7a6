"""The config's cross-field rules, one function per area, run by config.validate before anything loads.

Each raises ConfigError naming the keys in conflict and the fix (tests/test_combinations.py holds every pair
of options to that).
"""

from __future__ import annotations

from pathlib import Path

from slimtune.errors import ConfigError


def validate_engine(cfg) -> None:
    e = cfg.engine
    if e.name != "deepspeed":
        for key, value, default in (("zero_stage", e.zero_stage, 2), ("offload", e.offload, "none"),
                                    ("nvme_dir", e.nvme_dir, ""), ("config", e.config, "")):
            if value != default:
                raise ConfigError(f"engine.{key}={value} is a DeepSpeed setting: add engine.name=deepspeed "
                                  f"(engine.name={e.name})")
    if e.name != "ddp" and (cfg.offload.params != "none" or cfg.offload.optimizer != "none"):
        raise ConfigError(f"{_offload(cfg)} is slimtune's own offload engine (one process or DDP); with engine.name="
                          f"{e.name} use engine.name=deepspeed engine.offload=cpu|nvme instead, or drop one")
    o = cfg.optim
    if e.name in ("fsdp2", "deepspeed"):
        if o.name not in ("adamw", "sgd") or o.state_bits != 32 or o.in_backward or o.cram:
            raise ConfigError(f"engine.name={e.name} hands each rank a shard of every parameter, while optim.name="
                              f"{o.name} (state_bits={o.state_bits}, in_backward={o.in_backward}, cram={o.cram}) needs "
                              "whole matrices: use optim.name=adamw|sgd with optim.state_bits=32, or engine.name=ddp")
        if cfg.adapter.type == "sparse_ft":
            raise ConfigError(f"adapter.type=sparse_ft with engine.name={e.name} is not supported yet; use "
                              "engine.name=ddp")
    if e.offload == "nvme" and e.zero_stage < 2:
        raise ConfigError(f"engine.offload=nvme needs engine.zero_stage>=2 (got {e.zero_stage})")
    if e.config and not Path(e.config).expanduser().is_file():
        raise ConfigError(f"engine.config={e.config}: no such file; give the path of a DeepSpeed JSON")


def validate_optim(cfg) -> None:
    o = cfg.optim
    for key in ("rank", "update_gap"):
        if getattr(o, key) <= 0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be > 0")
    if not 0 <= o.density <= 1:
        raise ConfigError(f"optim.density={o.density} must be in [0, 1]")
    if o.scale <= 0 or o.inactive_lr_scale < 0:
        raise ConfigError("optim.scale must be > 0 and optim.inactive_lr_scale >= 0")
    if o.state_bits == 8 and o.name in ("sgd", "adamw8bit"):
        raise ConfigError(f"optim.state_bits=8 applies to adamw, galore, frugal and dct, not optim.name={o.name}")
    if o.in_backward:
        if cfg.train.grad_accum != 1:
            raise ConfigError(f"optim.in_backward=true steps during backward, so it needs train.grad_accum=1 "
                              f"(got {cfg.train.grad_accum})")
        if o.name == "frugal" and o.subspace == "modules":
            raise ConfigError("optim.subspace=modules picks whole parameters across the model, which "
                              "optim.in_backward=true (one optimizer per parameter) cannot do; drop one")
        if cfg.train.max_grad_norm > 0:
            raise ConfigError("optim.in_backward=true frees each gradient in backward, so gradients cannot be "
                              "clipped: set train.max_grad_norm=0")


def validate_sparse_ft(cfg) -> None:
    a, s = cfg.adapter, cfg.sparse_ft
    if not 0 < a.density <= 1:
        raise ConfigError(f"adapter.density={a.density} must be in (0, 1]")
    if a.num_params < 0:
        raise ConfigError(f"adapter.num_params={a.num_params} must be >= 0 (0: use adapter.density)")
    if s.reselect_every < 1 or not 0 <= s.accumulate_steps <= s.reselect_every:
        raise ConfigError(f"sparse_ft.reselect_every={s.reselect_every} must be >= 1 and sparse_ft.accumulate_steps="
                          f"{s.accumulate_steps} in [0, reselect_every]")
    if not 0 <= s.drop_fraction <= 1:
        raise ConfigError(f"sparse_ft.drop_fraction={s.drop_fraction} must be in [0, 1]")
    if a.type == "sparse_ft" and s.drop_fraction > 0 and s.accumulate_steps == 0:
        raise ConfigError("sparse_ft.accumulate_steps=0 leaves regrowth without statistics; set it >= 1 (or "
                          "sparse_ft.drop_fraction=0 for a fixed random set)")
    if a.type == "sparse_ft" and (cfg.offload.params != "none" or cfg.offload.optimizer != "none"):
        raise ConfigError(f"adapter.type=sparse_ft with {_offload(cfg)} is not supported yet; set offload.params=none "
                          "offload.optimizer=none")


def validate_compress(cfg) -> None:
    p, r, c = cfg.prune, cfg.recover, cfg.cram
    if not 0 < p.sparsity < 1:
        raise ConfigError(f"prune.sparsity={p.sparsity} must be in (0, 1)")
    for key, value in (("prune.calibration_samples", p.calibration_samples), ("prune.blocksize", p.blocksize)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if not 0 <= p.percdamp < 1:
        raise ConfigError(f"prune.percdamp={p.percdamp} must be in [0, 1)")
    for key in ("ce", "kd", "feature"):
        if getattr(r, key) < 0:
            raise ConfigError(f"recover.{key}={getattr(r, key)} must be >= 0")
    if r.ce + r.kd + r.feature == 0:
        raise ConfigError("recover.ce, recover.kd and recover.feature are all 0: give at least one a weight")
    if r.temperature <= 0:
        raise ConfigError(f"recover.temperature={r.temperature} must be > 0")
    if not 0 < cfg.data.select_fraction <= 1:
        raise ConfigError(f"data.select_fraction={cfg.data.select_fraction} must be in (0, 1]")
    if c.rho <= 0:
        raise ConfigError(f"cram.rho={c.rho} must be > 0")
    if not c.sparsities or not all(0 < s < 1 for s in c.sparsities):
        raise ConfigError(f"cram.sparsities={list(c.sparsities)} must be numbers in (0, 1)")
    if cfg.optim.cram and (cfg.optim.in_backward or cfg.offload.params != "none" or cfg.offload.optimizer != "none"):
        raise ConfigError(f"optim.cram=true needs the whole gradient before it steps: drop optim.in_backward="
                          f"{str(cfg.optim.in_backward).lower()} / {_offload(cfg)}")


def validate_offload(cfg) -> None:
    o = cfg.offload
    for key in ("prefetch", "io_threads"):
        if getattr(o, key) < 1:
            raise ConfigError(f"offload.{key}={getattr(o, key)} must be >= 1")
    if o.params == "none" and o.optimizer == "none":
        return
    if cfg.optim.in_backward:
        raise ConfigError(f"{_offload(cfg)} already steps each layer in backward; drop optim.in_backward=true")
    if cfg.optim.name == "frugal" and cfg.optim.subspace == "modules":
        raise ConfigError(f"optim.subspace=modules picks whole parameters across the model, which the offload "
                          f"engine ({_offload(cfg)}: one layer at a time) cannot do; use another optim.subspace")
    if o.activations == "keep" and o.params == "disk" and cfg.quant.method != "none":
        raise ConfigError("offload.activations=keep would keep each layer's dequantized weights for backward on a "
                          "quantized streamed base; use offload.activations=recompute (or auto)")
    if cfg.optim.name == "adamw8bit":
        raise ConfigError(f"optim.name=adamw8bit (bitsandbytes) keeps its state on its own; with {_offload(cfg)} "
                          "use optim.name=adamw optim.state_bits=8 (slimtune's 8-bit states, streamed to disk)")


def validate_precision(cfg) -> None:
    t = cfg.train
    if not 2 <= t.hadamard_block <= 256 or t.hadamard_block & (t.hadamard_block - 1):
        raise ConfigError(f"train.hadamard_block={t.hadamard_block} must be a power of two in [2, 256]")
    if t.precision != "default" and cfg.quant.method != "none":
        raise ConfigError(f"train.precision={t.precision} runs the linear layers' matmuls in low precision from "
                          f"full-precision weights, but quant.method={cfg.quant.method} already stores the base "
                          "quantized: set quant.method=none, or train.precision=default")


def validate_lowrank(cfg) -> None:
    """Rules of LQ-LoRA and the LoftQ / EoRA initialisations."""
    a, q, lq = cfg.adapter, cfg.quant, cfg.lq_lora
    if (a.type == "lq_lora" and q.method != "lq_lora") or (q.method == "lq_lora" and a.type == "none"):
        raise ConfigError(f"adapter.type={a.type} with quant.method={q.method}: LQ-LoRA decomposes the base "
                          "into quantized + low-rank (LoRA) parts, so set adapter.type=lq_lora and "
                          "quant.method=lq_lora")
    if q.method != "none" and q.backend != "slimtune" and (q.method not in ("nf4", "int8") or a.init != "default"):
        raise ConfigError(f"quant.method={q.method} adapter.init={a.init} needs quant.backend=slimtune "
                          "(bitsandbytes offers nf4/int8 with default init only)")
    if a.init == "pissa" and (a.type != "lora" or q.method == "lq_lora"):
        raise ConfigError(f"adapter.init=pissa with adapter.type={a.type} quant.method={q.method}: PiSSA initialises "
                          "plain LoRA on a plain or uniformly quantized base; set adapter.type=lora (and quant.method="
                          "none, nf4, ...)")
    if a.init not in ("default", "pissa") and (a.type != "lora" or q.method in ("none", "lq_lora")):
        raise ConfigError(f"adapter.init={a.init} initialises LoRA on a quantized base: set adapter.type=lora and "
                          "a quant.method such as nf4 or nf3 (lq_lora already initialises its own factors)")
    for key in ("calibration_samples", "max_iters", "score_iters"):
        if getattr(lq, key) <= 0:
            raise ConfigError(f"lq_lora.{key}={getattr(lq, key)} must be > 0")
    if not lq.bits or not all(isinstance(b, int) and 2 <= b <= 8 for b in lq.bits):
        raise ConfigError(f"lq_lora.bits={list(lq.bits)}: give bit widths in 2..8, e.g. [2, 3, 4]")
    if not lq.block_sizes or not all(isinstance(b, int) and b > 0 for b in lq.block_sizes):
        raise ConfigError(f"lq_lora.block_sizes={list(lq.block_sizes)}: give positive block sizes, e.g. [64, 128]")
    if not min(lq.bits) <= lq.budget_bits <= max(lq.bits) + 1:
        raise ConfigError(f"lq_lora.budget_bits={lq.budget_bits} is outside the candidate range "
                          f"{min(lq.bits)}..{max(lq.bits) + 1} bits/param (lq_lora.bits={list(lq.bits)})")


def validate_lora_variants(cfg) -> None:
    """Rules of rsLoRA, DoRA, PiSSA and LoRA+."""
    a, o, off = cfg.adapter, cfg.optim, cfg.offload
    lora_like = a.type in ("lora", "dora", "lq_lora")
    offloaded = off.params != "none" or off.optimizer != "none"
    if a.use_rslora and not lora_like:
        raise ConfigError(f"adapter.use_rslora=true scales LoRA factors, but adapter.type={a.type} has none: set "
                          "adapter.type=lora or dora, or drop adapter.use_rslora")
    if o.lora_plus_ratio < 0:
        raise ConfigError(f"optim.lora_plus_ratio={o.lora_plus_ratio} must be >= 0 (0 = off; LoRA+ suggests 16)")
    if o.lora_plus_ratio > 0 and (not lora_like or offloaded):
        raise ConfigError(f"optim.lora_plus_ratio={o.lora_plus_ratio} needs lora_B factors in slimtune's own "
                          f"optimizer (adapter.type={a.type}, {_offload(cfg)}): set adapter.type=lora or dora and "
                          "offload.params=none offload.optimizer=none, or optim.lora_plus_ratio=0")
    if a.init == "pissa" and offloaded:
        raise ConfigError(f"adapter.init=pissa rewrites the base weights, which {_offload(cfg)} streams: set "
                          "offload.params=none offload.optimizer=none, or adapter.init=default")
    if a.type == "dora" and (offloaded or cfg.train.precision != "default"
                             or (cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3)):
        raise ConfigError(f"adapter.type=dora reads the whole base weight in its forward, which {_offload(cfg)}, "
                          f"train.precision={cfg.train.precision} and engine.zero_stage=3 do not give it: drop those, "
                          "or use adapter.type=lora")


def _offload(cfg) -> str:
    """The offload keys as set, for messages that name them."""
    return f"offload.params={cfg.offload.params} offload.optimizer={cfg.offload.optimizer}"


def needs_lowrank(cfg) -> bool:
    """True when the base is quantized together with its low-rank factors (from the full-precision W). PiSSA on
    a plain base is not: it is set up as the adapters wrap it (adapters/pissa.py) and saved as a PEFT adapter."""
    return cfg.quant.method == "lq_lora" or (cfg.adapter.init != "default" and
                                             not (cfg.adapter.init == "pissa" and cfg.quant.method == "none"))


def load_dtype(cfg) -> str:
    """The dtype to load the base in: bf16 when a uniform quantization follows (the full-precision copy then
    never exists in fp32: lower peak memory); fp32 for full fine-tuning (its fp32 master weights are the
    file's values, not their bf16 rounding); else model.dtype (a decomposition needs the exact weights)."""
    if cfg.quant.method != "none" and not needs_lowrank(cfg):
        return "bfloat16"
    return "float32" if cfg.adapter.type == "none" else cfg.model.dtype
