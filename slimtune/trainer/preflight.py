"""The checks a run passes before anything loads: the config's own rules (config.validate, already run by
load_config) again with what `model.name` is (a pruned model, a quantized checkpoint: registry.BASES, read
from its small JSON files only) and the world size. A combination either passes here and trains, or is
refused here in one line naming both keys (tests/test_combinations.py holds every pair to that).
"""

from __future__ import annotations

from slimtune.errors import ConfigError
from slimtune.formats.pruned import MANIFEST as SPARSE_MANIFEST
from slimtune.registry import BASES
from slimtune.technique import check_run_flags


def base_kinds(name: str) -> tuple[str, ...]:
    """The kinds (registry.BASES) model.name is: "pruned", "quantized checkpoint", ..."""
    return tuple(kind for kind, base in BASES.items() if base.detect(name))


def check_run(cfg, world: int = 1) -> None:
    """Refuse (ConfigError, one line) a run `cfg` cannot train, before loading anything."""
    if cfg.model.keep_compressed:
        raise ConfigError(
            "model.keep_compressed=true is for slimtune eval and generate (each layer is decoded for "
            "its forward only); training decodes the checkpoint once at load: drop it"
        )
    bases = base_kinds(cfg.model.name)
    check_run_flags(cfg, bases, world)
    if "pruned" not in bases and not cfg.recover.teacher:
        name = cfg.model.name
        if (cfg.recover.kd or cfg.recover.feature) and cfg.qat.method == "none":  # QAT: model.name teaches
            raise ConfigError(
                f"recover.kd / recover.feature need a teacher: model.name={name!r} has no "
                f"{SPARSE_MANIFEST} naming its dense source; set recover.teacher=MODEL or qat.method"
            )
        if cfg.data.select == "degradation":
            raise ConfigError(
                f"data.select=degradation compares the pruned model with its dense source: "
                f"model.name={name!r} has no {SPARSE_MANIFEST}; give a pruned model or recover.teacher"
            )
