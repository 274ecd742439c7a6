"""Recipe configuration: YAML + dotted `key=value` overrides -> a frozen, validated dataclass tree.

Defaults live only in the dataclasses of `schema.py`. Every key is checked (unknown keys get the nearest valid
one suggested), every value is type-checked, and cross-field rules run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path

import yaml

from slimtune import rules
from slimtune.errors import ConfigError
from slimtune.registry import BY_KEY
from slimtune.schema import (  # noqa: F401  (re-exported: config.TrainConfig, ... as before)
    AdapterConfig, CheckpointConfig, CramConfig, DataConfig, EvalConfig, LoggingConfig, LQLoRAConfig, ModelConfig,
    OffloadConfig, OptimConfig, PruneConfig, QuantConfig, RecipeConfig, RecoverConfig, SparseFTConfig, TrainConfig)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------- building from dicts


@functools.cache
def _hints(cls) -> dict:
    """A section's field annotations, evaluated once (the schema's are strings: evaluating them each time made
    validate() ~90 ms)."""
    return typing.get_type_hints(cls)


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
    hints = _hints(cls)
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
    hints = _hints(cls)
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
    cls = _hints(RecipeConfig)[section] if section else RecipeConfig
    return _hints(cls)[name]


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
    cls = _hints(RecipeConfig)[section] if section else RecipeConfig
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
    for rule in (rules.validate_lowrank, rules.validate_lora_variants, rules.validate_compress,
                 rules.validate_sparse_ft, rules.validate_optim, rules.validate_offload, rules.validate_engine,
                 rules.validate_precision):
        rule(cfg)
    if cfg.quant.method == "nf4" and cfg.quant.block_size % 2:
        raise ConfigError(f"quant.block_size={cfg.quant.block_size} must be even for nf4 (2 codes per byte)")


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
