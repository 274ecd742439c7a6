"""The adapter contract: what an adapter family implements, so the trainer, checkpoints, `final/`, eval and
export never name one.

A family is one class, registered in `registry.ADAPTERS` under its `adapter.type`; its instances wrap one
linear-like module each (kept as `.base`, frozen). Its `format` names an entry of `registry.ADAPTER_FORMATS`,
which saves and loads a trained adapter dir (`final/`). Methods, with the defaults `AdapterDefaults` gives:

  from_config(base, cfg, name) -> module   wrap `base` (cfg: AdapterConfig; name: its qualified name)
  configure(model, names, cfg) -> cfg      check the config against the targeted shapes (LoRA: rank) and
                                           resolve what depends on them (sparse_ft: num_params -> density)
  training_hooks(model, cfg) -> [Hooks]    the family's own per-step work (sparse_ft: drop and regrow)
  trainable_parameters() -> [Parameter]    what the optimizer steps
  checkpoint_state() -> {name: Tensor}     what a step checkpoint needs beyond those (sparse_ft: indices)
  load_checkpoint_state(state)
  delta_weight() -> Tensor (out, in) fp32  W' - W, for merging into a full-precision weight
  merge(safe) / unmerge()                  in place, exactly reversible

A format is `AdapterFormat(save, load)`: save(model, adapter_cfg, out_dir, model_name, base_path, quant)
writes the dir atomically with a `slimtune_adapter.json` naming the format, the base model and its
quantization; load(model, adapter_dir) wraps the base as saved and fills the trained tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


class AdapterDefaults:
    """Mixin with the contract's optional methods (an adapter family overrides what it needs)."""

    format = "peft"

    @classmethod
    def configure(cls, model: nn.Module, names: list[str], cfg):
        return cfg

    @classmethod
    def training_hooks(cls, model: nn.Module, cfg) -> list:
        return []

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no checkpoint state, got {sorted(state)}")


@dataclass(frozen=True)
class AdapterFormat:
    save: Callable  # (model, adapter_cfg, out_dir, model_name, base_path, quant) -> None
    load: Callable  # (model, adapter_dir) -> list of wrapped module names


def checkpoint_state(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every adapter's checkpoint_state, keyed `<module name>.<key>` (CPU, contiguous)."""
    return {f"{name}.{k}": t.detach().cpu().contiguous() for name, m in modules.items()
            for k, t in m.checkpoint_state().items()}


def load_checkpoint_state(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        prefix = name + "."
        m.load_checkpoint_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
