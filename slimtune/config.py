"""Recipe configuration: YAML + dotted `key=value` overrides -> a frozen, validated dataclass tree.

Defaults live only in the dataclasses of `schema.py`. Every key is checked (unknown keys get the nearest valid
one suggested), every value is type-checked, and cross-field rules run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from slimtune.errors import ConfigError
from slimtune.registry import BY_KEY
from slimtune.schema import (  # noqa: F401  (re-exported: config.TrainConfig, ... as before)
    AdapterConfig, CheckpointConfig, CramConfig, DataConfig, EvalConfig, LoggingConfig, LQLoRAConfig, ModelConfig,
    OffloadConfig, OptimConfig, PruneConfig, QuantConfig, RecipeConfig, RecoverConfig, SparseFTConfig, TrainConfig)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------- building from dicts


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check `value` against annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            arms = typing.get_args(tp)
            if not arms:
                return tuple(value)
            return tuple(_coerce(f"{key}[{i}]", v, arms[0]) for i, v in enumerate(value))
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _build(cls, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = [prefix + n for n in fields]
            raise ConfigError(f"unknown key '{prefix}{key}'{_suggest(prefix + str(key), full)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name] or {}, f"{prefix}{name}.")
        else:
            value = raw[name]
            if f.metadata.get("ratio") and isinstance(value, int) and not isinstance(value, bool) and value >= 60:
                value = f"{value // 60}:{value % 60}"  # YAML 1.1 read an unquoted 2:4 as base 60 (124)
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def all_keys(cls=RecipeConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {k: (to_dict(v) if dataclasses.is_dataclass(v) else plain(v)) for k, v in vars(cfg).items()}


# ---------------------------------------------------------------- recipes and overrides


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file '{recipe}' not found; give an existing .yaml path or one of: "
                              f"{', '.join(list_recipes())}")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe '{recipe}'{_suggest(recipe, list_recipes()).replace('keys', 'recipes')}")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections")
    return data


def apply_override(raw: dict, item: str) -> None:
    """`a.b=value` sets raw['a']['b'] to the YAML scalar parse of value; a string key takes the text as
    written (YAML 1.1 would read output_dir=off as False, or a pattern 2:4 as the integer 124)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.max_steps=50)")
    key, text = item.split("=", 1)
    key = key.strip()
    if key not in all_keys():
        raise ConfigError(f"unknown key '{key}'{_suggest(key, all_keys())}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if _annotation(key) is str and not isinstance(value, str):
        value = text.strip()
    _set(raw, key, value)


def _annotation(key: str):
    section, _, name = key.rpartition(".")
    cls = typing.get_type_hints(RecipeConfig)[section] if section else RecipeConfig
    return typing.get_type_hints(cls)[name]


def _set(raw: dict, key: str, value) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def given_keys(recipe: str | None, overrides: list[str] = ()) -> set[str]:
    """Dotted keys the recipe file or the overrides set explicitly (the rest take dataclass defaults)."""
    raw = _read_yaml(recipe_path(recipe)) if recipe else {}
    for item in overrides:
        apply_override(raw, item)

    def walk(d, prefix=""):
        for k, v in d.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else (prefix + str(k),)

    return set(walk(raw))


def load_config(recipe: str | None, overrides: list[str] = ()) -> RecipeConfig:
    """Recipe name or YAML path (None = defaults only), then `key=value` overrides; validated."""
    raw = _read_yaml(recipe_path(recipe)) if recipe else {}
    for item in overrides:
        apply_override(raw, item)
    cfg = _build(RecipeConfig, raw)
    validate(cfg)
    return cfg


def choices(key: str) -> tuple | None:
    """The values `key` accepts: its registry's (a plugin kind) or the field's fixed set; None if any."""
    if key in BY_KEY:
        return BY_KEY[key].choices()
    section, _, name = key.rpartition(".")
    cls = typing.get_type_hints(RecipeConfig)[section] if section else RecipeConfig
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices")


def validate(cfg: RecipeConfig) -> None:
    """Value and cross-field rules; raises ConfigError naming the key and the fix."""
    flat = {k: _get(cfg, k) for k in all_keys()}
    for key, value in flat.items():
        allowed = choices(key)
        if allowed is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if v not in allowed:
                raise ConfigError(f"{key}={v!r} is not one of: {', '.join(map(str, allowed)) or '(none registered)'}")
    positive = ["train.max_steps", "train.seq_len", "train.batch_size", "train.grad_accum",
                "adapter.rank", "quant.block_size", "checkpoint.keep"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be > 0")
    for key in ["train.warmup_steps", "train.loss_chunk_tokens", "checkpoint.every", "eval.every",
                "eval.max_batches", "train.max_grad_norm", "optim.weight_decay"]:
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]} must be >= 0")
    if not 0 < flat["train.lr"]:
        raise ConfigError(f"train.lr={flat['train.lr']} must be > 0")
    if not 0 < flat["data.eval_fraction"] < 1:
        raise ConfigError(f"data.eval_fraction={flat['data.eval_fraction']} must be in (0, 1)")
    if not 0 <= flat["adapter.dropout"] < 1:
        raise ConfigError(f"adapter.dropout={flat['adapter.dropout']} must be in [0, 1)")
    if not 0 <= flat["train.min_lr_ratio"] <= 1:
        raise ConfigError(f"train.min_lr_ratio={flat['train.min_lr_ratio']} must be in [0, 1]")
    if flat["adapter.alpha"] <= 0:
        raise ConfigError(f"adapter.alpha={flat['adapter.alpha']} must be > 0")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1)")
    tm = cfg.adapter.target_modules
    if isinstance(tm, str) and tm != "all-linear":
        raise ConfigError(f"adapter.target_modules={tm!r}: give a list like [q_proj, v_proj] or all-linear")
    if isinstance(tm, tuple) and (not tm or not all(isinstance(t, str) for t in tm)):
        raise ConfigError("adapter.target_modules: give a non-empty list of module names or all-linear")
    if cfg.quant.method != "none" and cfg.adapter.type == "none":
        raise ConfigError(f"quant.method={cfg.quant.method} needs adapter.type=lora: a quantized base is "
                          "frozen, so full fine-tuning cannot train it (set quant.method=none)")
    _validate_lowrank(cfg)
    _validate_lora_variants(cfg)
    _validate_compress(cfg)
    _validate_sparse_ft(cfg)
    _validate_optim(cfg)
    _validate_offload(cfg)
    _validate_engine(cfg)
    _validate_precision(cfg)
    if cfg.quant.method == "nf4" and cfg.quant.block_size % 2:
        raise ConfigError(f"quant.block_size={cfg.quant.block_size} must be even for nf4 (2 codes per byte)")


def _validate_engine(cfg: RecipeConfig) -> None:
    e = cfg.engine
    if e.name != "deepspeed":
        for key, value, default in (("zero_stage", e.zero_stage, 2), ("offload", e.offload, "none"),
                                    ("nvme_dir", e.nvme_dir, ""), ("config", e.config, "")):
            if value != default:
                raise ConfigError(f"engine.{key}={value} is a DeepSpeed setting: add engine.name=deepspeed "
                                  f"(engine.name={e.name})")
    if e.name != "ddp" and (cfg.offload.params != "none" or cfg.offload.optimizer != "none"):
        raise ConfigError(f"offload.* is slimtune's own offload engine (one process or DDP); with engine.name="
                          f"{e.name} use engine.name=deepspeed engine.offload=cpu|nvme instead, or drop one")
    o = cfg.optim
    if e.name in ("fsdp2", "deepspeed"):
        if o.name not in ("adamw", "sgd") or o.state_bits != 32 or o.in_backward or o.cram:
            raise ConfigError(f"engine.name={e.name} hands each rank a shard of every parameter, while optim.name="
                              f"{o.name} (state_bits={o.state_bits}, in_backward={o.in_backward}, cram={o.cram}) needs "
                              "whole matrices: use optim.name=adamw|sgd with optim.state_bits=32, or engine.name=ddp")
        if cfg.adapter.type == "sparse_ft":
            raise ConfigError(f"adapter.type=sparse_ft with engine.name={e.name} is not supported yet; use engine.name=ddp")
    if e.offload == "nvme" and e.zero_stage < 2:
        raise ConfigError(f"engine.offload=nvme needs engine.zero_stage>=2 (got {e.zero_stage})")
    if e.config and not Path(e.config).expanduser().is_file():
        raise ConfigError(f"engine.config={e.config}: no such file; give the path of a DeepSpeed JSON")


def _validate_optim(cfg: RecipeConfig) -> None:
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


def _validate_sparse_ft(cfg: RecipeConfig) -> None:
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
        raise ConfigError("adapter.type=sparse_ft with offload.* is not supported yet; set offload.*=none")


def _validate_compress(cfg: RecipeConfig) -> None:
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
        raise ConfigError("optim.cram=true needs the whole gradient before it steps: drop optim.in_backward and "
                          "offload.*")


def _validate_offload(cfg: RecipeConfig) -> None:
    o = cfg.offload
    for key in ("prefetch", "io_threads"):
        if getattr(o, key) < 1:
            raise ConfigError(f"offload.{key}={getattr(o, key)} must be >= 1")
    if o.params == "none" and o.optimizer == "none":
        return
    if cfg.optim.in_backward:
        raise ConfigError("offload.* already steps each layer in backward; drop optim.in_backward=true")
    if cfg.optim.name == "frugal" and cfg.optim.subspace == "modules":
        raise ConfigError("optim.subspace=modules picks whole parameters across the model, which the offload "
                          "engine (one layer at a time) cannot do; use another optim.subspace or offload.*=none")
    if o.activations == "keep" and o.params == "disk" and cfg.quant.method != "none":
        raise ConfigError("offload.activations=keep would keep each layer's dequantized weights for backward on a "
                          "quantized streamed base; use offload.activations=recompute (or auto)")
    if cfg.optim.name == "adamw8bit":
        raise ConfigError("optim.name=adamw8bit (bitsandbytes) keeps its state on its own; with offload.* use "
                          "optim.name=adamw optim.state_bits=8 (slimtune's 8-bit states, streamed to disk)")


def _validate_precision(cfg: RecipeConfig) -> None:
    t = cfg.train
    if not 2 <= t.hadamard_block <= 256 or t.hadamard_block & (t.hadamard_block - 1):
        raise ConfigError(f"train.hadamard_block={t.hadamard_block} must be a power of two in [2, 256]")
    if t.precision != "default" and cfg.quant.method != "none":
        raise ConfigError(f"train.precision={t.precision} runs the linear layers' matmuls in low precision from "
                          f"full-precision weights, but quant.method={cfg.quant.method} already stores the base "
                          "quantized: set quant.method=none, or train.precision=default")


def _validate_lowrank(cfg: RecipeConfig) -> None:
    """Rules of LQ-LoRA and the LoftQ / EoRA initialisations."""
    a, q, lq = cfg.adapter, cfg.quant, cfg.lq_lora
    if (a.type == "lq_lora" and q.method != "lq_lora") or (q.method == "lq_lora" and a.type == "none"):
        raise ConfigError(f"adapter.type={a.type} with quant.method={q.method}: LQ-LoRA decomposes the base "
                          "into quantized + low-rank (LoRA) parts, so set adapter.type=lq_lora and quant.method=lq_lora")
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


def _validate_lora_variants(cfg: RecipeConfig) -> None:
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
                          f"optimizer (adapter.type={a.type}, offload.*={off.params}/{off.optimizer}): set "
                          "adapter.type=lora or dora and offload.*=none, or optim.lora_plus_ratio=0")
    if a.init == "pissa" and offloaded:
        raise ConfigError("adapter.init=pissa rewrites the base weights, which offload.* streams: set offload.*=none "
                          "or adapter.init=default")
    if a.type == "dora" and (offloaded or cfg.train.precision != "default"
                             or (cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3)):
        raise ConfigError("adapter.type=dora reads the whole base weight in its forward, which offload.*, "
                          "train.precision!=default and ZeRO-3 do not give it: drop those, or use adapter.type=lora")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace(cfg: RecipeConfig, **dotted) -> RecipeConfig:
    """Copy with dotted keys replaced, e.g. replace(cfg, **{"train.max_steps": 5})."""
    raw = to_dict(cfg)
    for key, value in dotted.items():
        if key not in all_keys():
            raise ConfigError(f"unknown key '{key}'{_suggest(key, all_keys())}")
        _set(raw, key, value)
    return _build(RecipeConfig, raw)


def dump_yaml(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
