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
    "clippable": "the whole gradient before the step (to clip its norm)",
    "accumulation": "gradients kept across micro-steps",
    "single_process": "one process (no torchrun)",
    "whole_base_weight": "the whole frozen base weight in its forward",
    "trainable_base": "a base whose weights can be trained",
    "full_precision_linears": "full-precision linear layers in the base",
    "exact_zero": "a base that keeps 0 exactly (the pruned weights stay pruned)",
    "streamable": "what the offload engine can stream (not yet: see the README's table)",
    "quantized_base": "a base quantized with a uniform format",
    "plain_lora": "plain LoRA factors (adapter.type=lora)",
    "lora_factors": "LoRA factors (adapter.type=lora, dora or lq_lora)",
    "slimtune_format": "one of slimtune's own quantized formats (quant.backend=slimtune)",
    "per_tensor_state": "an optimizer state it can hold (slimtune's, not bitsandbytes')",
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
                    raise ConfigError(f"{a.label} needs {FLAGS[flag]}, which {b.label} does not give: change one "
                                      f"of {a.key} and {b.key}")
