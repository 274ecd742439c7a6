"""Registries by name for the pluggable families (adapters, optimizers, ...).

    OPTIMIZERS = Registry("optim.name")
    @OPTIMIZERS.register("adamw")
    def build(...): ...
    OPTIMIZERS.get("adamw")   # unknown -> ConfigError naming the key and the registered names
"""

from __future__ import annotations

from slimtune.errors import ConfigError


class Registry(dict):
    def __init__(self, key: str):
        super().__init__()
        self.key = key  # the config key that selects an entry, for error messages

    def register(self, name: str):
        def deco(obj):
            if name in self:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self[name] = obj
            return obj

        return deco

    def get(self, name: str):
        if name not in self:
            raise ConfigError(f"{self.key}={name!r} is not registered; registered: {', '.join(sorted(self))}")
        return self[name]
