"""Recipe configuration: YAML + dotted `key=value` overrides -> a frozen, validated dataclass tree.

The tree is `schema.py`'s core sections plus every technique's own section (registered by its file:
`schema.config_section`), put together by `recipe_class()`. Defaults live only in those dataclasses. Every key
is checked (unknown keys get the nearest valid one suggested; renamed keys still work, with one notice line:
aliases.py), every value is type-checked, and the rules (rules.py, each technique's own, and the flags of
technique.py) run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path

import yaml

from slimtune import aliases, rules
from slimtune.technique import check_run_flags
from slimtune.errors import ConfigError
from slimtune.registry import BY_KEY, SECTIONS
from slimtune.schema import (  # noqa: F401  (re-exported: config.TrainConfig, ... as before)
    AdapterConfig,
    CheckpointConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PruneConfig,
    QuantConfig,
    RecoverConfig,
    TrainConfig,
)
from slimtune.schema import RecipeConfig as CoreConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------- the tree: core sections + technique sections

_CLASSES: dict[tuple, type] = {}


def recipe_class() -> type:
    """The recipe's dataclass: schema's core sections, then each registered technique section (as registered),
    then the core's top-level keys. Rebuilt when a technique registers a new section."""
    key = tuple(SECTIONS.items())
    if key not in _CLASSES:
        core = _hints(CoreConfig)
        fields = [
            (f.name, core[f.name], f) for f in dataclasses.fields(CoreConfig) if dataclasses.is_dataclass(core[f.name])
        ]
        fields += [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in SECTIONS.items()]
        fields += [
            (f.name, core[f.name], f)
            for f in dataclasses.fields(CoreConfig)
            if not dataclasses.is_dataclass(core[f.name])
        ]
        _CLASSES[key] = dataclasses.make_dataclass("RecipeConfig", fields, frozen=True)
    return _CLASSES[key]


def __getattr__(name: str):
    if name == "RecipeConfig":  # config.RecipeConfig: the whole tree, technique sections included
        return recipe_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """The closest valid key, or the new name of the closest renamed one (adapter.rnak -> lora.rank)."""
    section = key.split(".")[0] + "."
    old = [k for k in aliases.OLD_KEYS if k.startswith(section) or "." not in key]
    close = difflib.get_close_matches(key, [*valid, *old], n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{aliases.new_key(close[0]) if close[0] in old else close[0]}'?"
    return f"; valid keys: {', '.join(sorted(valid))}"


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


def all_keys(cls=None, prefix: str = "") -> list[str]:
    cls = cls or recipe_class()
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
            raise ConfigError(
                f"recipe file '{recipe}' not found; give an existing .yaml path or one of: {', '.join(list_recipes())}"
            )
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
    if key not in all_keys() and key not in aliases.OLD_KEYS:
        raise ConfigError(f"unknown key '{key}'{_suggest(key, all_keys())}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if _annotation(aliases.new_key(key)) is str and not isinstance(value, str):
        value = text.strip()
    _set(raw, key, value)


def _annotation(key: str):
    section, _, name = key.rpartition(".")
    root = recipe_class()
    cls = _hints(root)[section] if section else root
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


def load_config(recipe: str | None, overrides: list[str] = (), notice=None):
    """Recipe name or YAML path (None = defaults only), then `key=value` overrides; validated. Renamed keys
    are moved to their new names, and `notice` (default: print on stderr) gets one line naming them all."""
    raw = _read_yaml(recipe_path(recipe)) if recipe else {}
    renamed = aliases.rename(raw)
    given = {}
    for item in overrides:
        apply_override(given, item)
    renamed += aliases.rename(given, context=raw)  # an old key given wins over the recipe's new one
    for section, value in given.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section].update(value)
        else:
            raw[section] = value
    if renamed:
        (notice or aliases.print_notice)(renamed)
    cfg = _build(recipe_class(), raw)
    validate(cfg)
    return cfg


def choices(key: str) -> tuple | None:
    """The values `key` accepts: its registry's (a plugin kind) or the field's fixed set; None if any."""
    if key in BY_KEY:
        return BY_KEY[key].choices()
    section, _, name = key.rpartition(".")
    root = recipe_class()
    cls = _hints(root)[section] if section else root
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices")


def validate(cfg) -> None:
    """Value and cross-field rules; raises ConfigError naming the key and the fix. The rules that need to know
    what model.name is (a pruned model, a quantized checkpoint) or the world size run in trainer/preflight.py."""
    flat = {k: _get(cfg, k) for k in all_keys()}
    for key, value in flat.items():
        allowed = choices(key)
        if allowed is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if v not in allowed:
                raise ConfigError(f"{key}={v!r} is not one of: {', '.join(map(str, allowed)) or '(none registered)'}")
    rules.validate_core(cfg)
    check_run_flags(cfg)  # every active technique's own rules, then the flags between them (technique.py)


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace(cfg, **dotted):
    """Copy with dotted keys replaced, e.g. replace(cfg, **{"train.max_steps": 5})."""
    raw = to_dict(cfg)
    for key, value in dotted.items():
        if key not in all_keys():
            raise ConfigError(f"unknown key '{key}'{_suggest(key, all_keys())}")
        _set(raw, key, value)
    return _build(recipe_class(), raw)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
