"""What a technique declares about itself, in its own file, so that which options combine is derived, not kept
by hand.

A technique is whatever a config key selects (an adapter, a quantized format, an optimizer, an engine, ...)
or switches on (optimizer-in-backward, clipping, a pruned base). It declares:

  requires(cfg) -> set of flags     what it needs from the rest of the run
  withholds(cfg) -> set of flags    what it takes away from the rest of the run
  validate(cfg)                      its own value rules (ConfigError naming its keys)

`check_flags(cfg, active)` is the one generic rule: when technique A requires a flag that technique B
withholds, the run is refused in one line naming both keys and the flag's meaning. The flags' vocabulary is
FLAGS below; a new technique uses those words (or adds one here) and every pairing follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.errors import ConfigError

# flag -> what it means, as the refusal reads: "<a> needs <meaning>, which <b> does not give"
FLAGS = {
    "whole_matrices": "each rank to hold whole parameter matrices",
    "gradients_in_memory": "every gradient in memory before the optimizer step",
    "trainer_step": "the optimizer step left to the trainer (not run by the engine inside backward)",
    "clippable": "the whole gradient before the step (to clip its norm)",
    "accumulation": "gradients kept across micro-steps",
    "single_process": "one process (no torchrun)",
    "whole_base_weight": "the whole frozen base weight in its forward",
    "trainable_base": "a base whose weights can be trained",
    "full_precision_linears": "full-precision linear layers in the base",
    "exact_zero": "a base that keeps 0 exactly (the pruned weights stay pruned)",
    "streamable": "every other technique to work on one streamed layer at a time",
    "quantized_base": "a base quantized with a uniform format",
    "plain_lora": "plain LoRA factors (adapter.type=lora)",
    "lora_factors": "LoRA factors (adapter.type=lora, dora or lq_lora)",
    "slimtune_format": "one of slimtune's own quantized formats (quant.backend=slimtune)",
    "per_tensor_state": "an optimizer state it can hold (slimtune's, not bitsandbytes')",
    "lq_lora_base": "a base LQ-LoRA decomposes (quant.method=lq_lora)",
    "undecomposed_base": "a base no other decomposition initialises (quant.method=lq_lora does its own)",
}


@dataclass(frozen=True)
class Active:
    """One active technique of a run: the key and value that select it, and its declaration."""

    key: str
    value: object
    technique: object  # anything with requires / withholds (classmethods or functions of cfg)

    @property
    def label(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else self.value
        return f"{self.key}={value}"


class Technique:
    """Defaults for a declaration: needs nothing, withholds nothing, no rules of its own."""

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return set()

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return set()

    @classmethod
    def validate(cls, cfg) -> None:
        return None


def declares(requires=(), withholds=(), validate=None, section: str | None = None, **terms):
    """Give a function-style technique (an optimizer builder, an adapter init) its declaration as attributes:
    requires / withholds as flag sets or functions of cfg, a validate(cfg), its section's name, and its memory
    terms for the planner (`terms`: e.g. an optimizer's state_bytes / step_bytes, optim/memory.py)."""

    def as_fn(flags):
        return flags if callable(flags) else (lambda cfg, fixed=frozenset(flags): set(fixed))

    def deco(obj):
        obj.requires, obj.withholds, obj.section = as_fn(requires), as_fn(withholds), section
        obj.validate = validate or (lambda cfg: None)
        for name, fn in terms.items():
            setattr(obj, name, fn)
        return obj

    return deco


def options_of(cfg, technique):
    """The technique's own config section (`technique.section` names it), or None when it has none."""
    name = getattr(technique, "section", None)
    return getattr(cfg, name) if name else None


def _flags(technique, which: str, cfg) -> set[str]:
    fn = getattr(technique, which, None)
    flags = set(fn(cfg)) if fn is not None else set()
    unknown = flags - set(FLAGS)
    if unknown:
        raise ValueError(f"{technique!r}.{which} names unknown flags {sorted(unknown)}; add them to technique.FLAGS")
    return flags


def check_flags(cfg, active: list[Active]) -> None:
    """Refuse (ConfigError, one line naming both keys) the first pair where one active technique requires a
    flag another withholds; keys in the order given, flags in FLAGS' order."""
    withheld = [(a, _flags(a.technique, "withholds", cfg)) for a in active]
    for a in active:
        needs = _flags(a.technique, "requires", cfg)
        for flag in (f for f in FLAGS if f in needs):
            for b, flags in withheld:
                if b is not a and flag in flags:
                    raise ConfigError(
                        f"{a.label} needs {FLAGS[flag]}, which {b.label} does not give: change one "
                        f"of {a.key} and {b.key}"
                    )


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def active_techniques(cfg, bases: tuple = (), world: int = 1) -> list[Active]:
    """The techniques `cfg` switches on: one per selecting key (adapter.type, quant.method, quant.backend,
    adapter.init, optim.name, train.precision, engine.name), every active option (registry.OPTIONS), the hooks, and the
    kinds of model.name (`bases`, from registry.BASES, known once its files are looked at) and torchrun."""
    from slimtune.registry import (
        ADAPTER_INITS,
        ADAPTERS,
        BACKENDS,
        BASES,
        ENGINES,
        HOOKS,
        OPTIMIZERS,
        OPTIONS,
        PRECISIONS,
        QUANT_FORMATS,
    )

    out = []
    for key, registry in (
        ("adapter.type", ADAPTERS),
        ("quant.method", QUANT_FORMATS),
        ("quant.backend", BACKENDS),
        ("adapter.init", ADAPTER_INITS),
        ("optim.name", OPTIMIZERS),
        ("train.precision", PRECISIONS),
        ("engine.name", ENGINES),
    ):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        technique = registry.technique(value)
        if technique is not None:
            out.append(Active(key, value, technique))
    for key, option in OPTIONS.items():
        if option.active(cfg, world):
            shown = getattr(option, "shown", None)
            out.append(Active(key, shown(cfg, world) if shown else _get(cfg, key), option))
    for name in cfg.hooks:
        out.append(Active("hooks", name, HOOKS.get(name)))
    for kind in bases:
        out.append(Active("model.name", f"{cfg.model.name} ({kind})", BASES[kind]))
    return out


def check_run_flags(cfg, bases: tuple = (), world: int = 1) -> None:
    """Every active technique's own rules, then the flags between them."""
    active = active_techniques(cfg, bases, world)
    for a in active:
        validate = getattr(a.technique, "validate", None)
        if validate is not None:
            validate(cfg)
    check_flags(cfg, active)
