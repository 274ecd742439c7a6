"""One registry per plugin kind; the config key that selects an entry takes its allowed values from it.

    @OPTIMIZERS.register("galore")
    def build(cfg, named_params, lr): ...
    OPTIMIZERS.get("galore")      # unknown -> ConfigError naming the key and every registered name

Registering is all it takes to make a name selectable: `config.validate` checks each key against
`registry.choices()`, so the error message lists the new name too. The registries are filled when the
plugin packages are imported, which `slimtune/__init__.py` does (so any `import slimtune.x` sees them full).
"""

from __future__ import annotations

from slimtune.errors import ConfigError


class Registry(dict):
    def __init__(self, key: str, fixed: tuple = ()):
        super().__init__()
        self.key = key  # the config key that selects an entry, for error messages
        self.fixed = tuple(fixed)  # values the key accepts that select no entry (e.g. "none")

    def register(self, name: str):
        def deco(obj):
            if name in self or name in self.fixed:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self[name] = obj
            return obj

        return deco

    def get(self, name: str):
        if name not in self:
            raise ConfigError(f"{self.key}={name!r} is not registered; registered: {', '.join(self.choices())}")
        return self[name]

    def choices(self) -> tuple:
        """Every value the config key accepts: the fixed ones, then the registered names in order."""
        return self.fixed + tuple(self)


ADAPTERS = Registry("adapter.type", fixed=("none",))  # name -> adapter class (adapters/base.py's contract)
ADAPTER_FORMATS = Registry("adapter format")  # an adapter class's `format` -> adapters.base.AdapterFormat
ADAPTER_INITS = Registry("adapter.init", fixed=("default",))  # name -> init(model, cfg, calibration, dtype, log)
QUANT_FORMATS = Registry("quant.method", fixed=("none", "lq_lora"))  # name -> frozen quantized linear class
OPTIMIZERS = Registry("optim.name")  # name -> builder(cfg, named_params, lr) -> torch.optim.Optimizer
PRECISIONS = Registry("train.precision", fixed=("default",))  # name -> swap(linear, train_cfg) -> module
HOOKS = Registry("hooks")  # name -> trainer.hooks.Hooks subclass, built with no arguments
# name -> a class with `statistic` (None | "sq_norms" | "hessian": what layerwise calibration collects) and
# `prune(W, stat, sparsity, nm, scope, cfg)` pruning W in place (cfg: PruneConfig)
PRUNE_METHODS = Registry("prune.method")
# the manifest file of a model dir slimtune writes (compressed export, quantized checkpoint, pruned model) ->
# verify(dir): its files against the manifest's checksums (models.verify_model_dir runs them before any read)
DIR_VERIFIERS = Registry("model dir manifest")

# config key -> its registry (config.validate reads the allowed values from here)
BY_KEY = {r.key: r for r in (ADAPTERS, ADAPTER_INITS, QUANT_FORMATS, OPTIMIZERS, PRECISIONS, HOOKS,
                                PRUNE_METHODS)}
