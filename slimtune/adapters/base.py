"""The adapter contract: what an adapter family implements, so the trainer, checkpoints, `final/`, eval and
export never name one.

A family is one class, registered in `registry.ADAPTERS` under its `adapter.type`; its instances wrap one
linear-like module each (kept as `.base`, frozen). Its `format` names an entry of `registry.ADAPTER_FORMATS`,
which saves and loads a trained adapter dir (`final/`). Methods, with the defaults `AdapterDefaults` gives:

  from_config(base, options, name, init)   wrap `base` (options: the family's own section, lora.* / sparse_ft.*;
               -> module                   name: its qualified name; init: adapter.init)
  configure(model, names, options)         check the options against the targeted shapes (LoRA: rank) and
               -> options                  resolve what depends on them (sparse_ft: num_params -> density)
  training_hooks(model, options,           the family's own per-step work (sparse_ft: drop and regrow)
                 max_steps) -> [Hooks]
  section, requires / withholds / validate  its declaration (technique.py): which options combine with it
  memory_terms(options, out, in_, share,   its memory for the planner (AdapterTerms; default: the module built
               max_steps) -> AdapterTerms  on a meta-device linear, its trainable parameters and buffers)
  plan_kind, plan_dropout                  what plan/activations.py counts of its forward ("lora" | "sparse")
  trainable_parameters() -> [Parameter]    what the optimizer steps
  checkpoint_state() -> {name: Tensor}     what a step checkpoint needs beyond those (sparse_ft: indices)
  load_checkpoint_state(state)
  delta_weight() -> Tensor (out, in) fp32  W' - W, for merging into a full-precision weight
  merge(safe) / unmerge()                  in place, exactly reversible

A format is `AdapterFormat(save, load)`: save(model, options, out_dir, model_name, base_path, quant)
writes the dir atomically with a `slimtune_adapter.json` naming the format, the base model and its
quantization; load(model, adapter_dir) wraps the base as saved and fills the trained tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from slimtune.technique import Technique


@dataclass
class AdapterTerms:
    """One wrapped linear's memory as the planner counts it (bytes beside the base's own)."""

    trainable: list[tuple[str, tuple]]  # (parameter name inside the adapter, shape): fp32 master weights
    buffer_bytes: int = 0  # frozen tensors beside them (sparse_ft's indices)
    state_bytes: int = 0  # statistics allocated when training starts and kept (sparse_ft's SM3 sums)
    step_bytes: int = 0  # held around some optimizer steps (sparse_ft's dense gradient sums before a reselection)
    width: int = 0  # values per token its forward saves besides its input (LoRA: the rank, B's input)


class AdapterDefaults(Technique):
    """Mixin with the contract's optional methods (an adapter family overrides what it needs), and its
    declaration (technique.Technique: requires / withholds / validate, `section`: its options' section)."""

    format = "peft"
    section = None
    plan_kind = "lora"  # plan/activations.py: saves its input and a low-rank product ("lora") | "sparse"
    plan_dropout = False  # plan/activations.py: a dropped-out copy of the input is saved when dropout > 0

    @classmethod
    def memory_terms(cls, options, out_features: int, in_features: int, share: float, max_steps: int) -> AdapterTerms:
        """share: this linear's fraction of all targeted weights. The default builds the adapter on a meta-device
        linear (no memory) and counts what it adds: trainable parameters and buffers."""
        with torch.device("meta"):
            m = cls.from_config(nn.Linear(in_features, out_features, bias=False), options)
        own = [(n, t) for n, t in [*m.named_parameters(), *m.named_buffers()] if not n.startswith("base.")]
        return AdapterTerms(
            [(n, tuple(t.shape)) for n, t in own if isinstance(t, nn.Parameter) and t.requires_grad],
            sum(t.numel() * t.element_size() for n, t in own if not isinstance(t, nn.Parameter)),
        )

    @classmethod
    def configure(cls, model: nn.Module, names: list[str], cfg):
        return cfg

    @classmethod
    def training_hooks(cls, model: nn.Module, options, max_steps: int) -> list:
        return []

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no checkpoint state, got {sorted(state)}")


@dataclass(frozen=True)
class AdapterFormat:
    save: Callable  # (model, options (the adapter's section), out_dir, model_name, base_path, quant) -> None
    load: Callable  # (model, adapter_dir) -> list of wrapped module names


def checkpoint_state(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every adapter's checkpoint_state, keyed `<module name>.<key>` (CPU, contiguous)."""
    return {
        f"{name}.{k}": t.detach().cpu().contiguous()
        for name, m in modules.items()
        for k, t in m.checkpoint_state().items()
    }


def load_checkpoint_state(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        prefix = name + "."
        m.load_checkpoint_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
