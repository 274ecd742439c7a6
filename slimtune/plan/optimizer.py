"""Optimizer state and the step's working memory: the sum of the memory terms the chosen optimizer declares
beside its builder (optim/memory.py: state_bytes / step_bytes per tensor, shared_bytes once; Adam's when it
declares none), counted as slimtune/optim/ allocates them."""

from __future__ import annotations

from slimtune.optim.memory import adam_state_bytes, adam_step_bytes
from slimtune.plan.weights import Tensor
from slimtune.registry import OPTIMIZERS


def _terms(cfg):
    """(technique, its options section) of RecipeConfig `cfg`'s optimizer."""
    from slimtune.technique import options_of

    build = OPTIMIZERS.get(cfg.optim.name)
    return build, options_of(cfg, build)


def state_bytes(cfg, tensors: list[Tensor]) -> int:
    """Bytes of the optimizer state after its first step. cfg: RecipeConfig; tensors: the trainable ones."""
    build, options = _terms(cfg)
    per_tensor = getattr(build, "state_bytes", adam_state_bytes)
    shared = getattr(build, "shared_bytes", None)
    total = sum(per_tensor(cfg.optim, options, t.name, t.shape) for t in tensors)
    return total + (shared(cfg.optim, options, [(t.name, t.shape) for t in tensors]) if shared else 0)


def step_transient_bytes(cfg, tensors: list[Tensor]) -> int:
    """Working memory of the optimizer step at its largest tensor, plus what the steps keep cached (DCT's bases)."""
    if not tensors:
        return 0
    build, options = _terms(cfg)
    per_tensor = getattr(build, "step_bytes", adam_step_bytes)
    cache = getattr(build, "cache_bytes", None)
    peak = max(per_tensor(cfg.optim, options, t.name, t.shape) for t in tensors)
    return int(peak) + (cache(cfg.optim, options, [(t.name, t.shape) for t in tensors]) if cache else 0)
