"""Pruning and recovery's building blocks: one file per pruning method (magnitude.py, wanda.py, sparsegpt.py,
registered in PRUNE_METHODS under prune.method), their shared patterns (patterns.py), the layer-sequential
driver (layerwise.py), masks held during training (masks.py), distillation losses (distill.py) and recovery
data selection (select.py). The pruned dir on disk is formats/pruned.py; `slimtune prune` is model/commands.py.
"""

from slimtune.prune import magnitude, sparsegpt, wanda  # noqa: F401  (fill PRUNE_METHODS)
