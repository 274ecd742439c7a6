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
        self.declared: dict = {}  # fixed value -> its declaration (technique.Technique), by the file implementing it

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

    def declare(self, name: str, technique) -> None:
        """Attach what a fixed value (quant.method=none, adapter.type=none, ...) declares about itself."""
        if name not in self.fixed:
            raise ValueError(f"{self.key}: {name!r} is not one of the fixed values {self.fixed}")
        self.declared[name] = technique

    def technique(self, name: str):
        """The declaration of value `name`: the registered entry, a fixed value's declaration, or None."""
        return self[name] if name in self else self.declared.get(name)

    def choices(self) -> tuple:
        """Every value the config key accepts: the fixed ones, then the registered names in order."""
        return self.fixed + tuple(self)


ADAPTERS = Registry("adapter.type", fixed=("none",))  # name -> adapter class (adapters/base.py's contract)
ADAPTER_FORMATS = Registry("adapter format")  # an adapter class's `format` -> adapters.base.AdapterFormat
ADAPTER_INITS = Registry("adapter.init", fixed=("default",))  # name -> init(model, setup, calibration, dtype, log)
QUANT_FORMATS = Registry("quant.method", fixed=("none", "lq_lora"))  # name -> frozen quantized linear class
OPTIMIZERS = Registry("optim.name")  # name -> builder(cfg, named_params, lr) -> torch.optim.Optimizer
PRECISIONS = Registry("train.precision", fixed=("default",))  # name -> swap(linear, train_cfg) -> module
HOOKS = Registry("hooks")  # name -> trainer.hooks.Hooks subclass, built with no arguments
# name -> a class with `statistic` (None | "sq_norms" | "hessian": what layerwise calibration collects) and
# `prune(W, stat, sparsity, nm, scope, cfg)` pruning W in place (cfg: PruneConfig)
PRUNE_METHODS = Registry("prune.method")
# name -> engine class (engines/ddp.py's interface): ddp, fsdp2, deepspeed, offload
ENGINES = Registry("engine.name")
# section name -> its frozen config dataclass (schema.config_section): a technique's own options (galore.*, ...)
SECTIONS = Registry("config section")
# a key that switches a technique on (optim.in_backward, train.max_grad_norm, ...) -> its declaration, with
# `active(cfg) -> bool`
OPTIONS = Registry("option")
# a kind of model.name (pruned, quantized checkpoint) -> its declaration, with `detect(name) -> bool`
BASES = Registry("model kind")
# quant.backend -> its declaration
BACKENDS = Registry("quant.backend")
# the manifest file of a model dir slimtune writes (compressed export, quantized checkpoint, pruned model) ->
# verify(dir): its files against the manifest's checksums (models.verify_model_dir runs them before any read)
DIR_VERIFIERS = Registry("model dir manifest")

# config key -> its registry (config.validate reads the allowed values from here)
BY_KEY = {
    r.key: r
    for r in (ADAPTERS, ADAPTER_INITS, QUANT_FORMATS, OPTIMIZERS, PRECISIONS, HOOKS, PRUNE_METHODS, ENGINES, BACKENDS)
}
