"""Optimizer-in-backward: each parameter is stepped as soon as its gradient is complete, then its .grad
is dropped, so the full set of gradients never exists at once (peak memory saves ~one copy of the
trainable weights). The pattern of torchtune's `optimizer_in_backward` on PyTorch's
`Tensor.register_post_accumulate_grad_hook`.

    opt = OptimizerInBackward(params, lambda ps: AdamW(ps, lr=1e-4))
    loss.backward()          # every parameter has been updated, and p.grad is None
    opt.step(); opt.zero_grad(set_to_none=True)   # no-ops, so a plain training loop runs unchanged

Limits:
- Gradient clipping cannot work: a global norm needs every gradient, and they are gone (clip_grad_norm_
  after backward sees no gradients and returns 0). Per-parameter clipping would have to be inside the
  inner optimizer.
- Gradient accumulation: with accumulation_steps=k a parameter steps on every k-th backward only; its
  gradient is kept in between, so for k > 1 the memory saving is lost until the last micro-step.
- Single process: under DDP the step would run before gradients are reduced across ranks.
- A step runs even if the loss turns out non-finite; the loop only notices afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch.utils.hooks import RemovableHandle

from slimtune.registry import OPTIONS
from slimtune.technique import Technique


class OptimizerInBackward:
    """One optimizer per parameter, built by `make([p])`, stepped from a post-accumulate-grad hook.

    Looks like an Optimizer to a training loop: `param_groups` are the inner optimizers' own group dicts
    (setting group["lr"] reaches them), `state` maps each parameter to its inner state, and
    `state_dict()` is {parameter index: inner optimizer's state_dict()} (tensors and scalars only)."""

    def __init__(
        self, params: Iterable[torch.Tensor], make: Callable[[list], torch.optim.Optimizer], accumulation_steps: int = 1
    ):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("OptimizerInBackward got no parameters that require grad")
        self.optimizers = [make([p]) for p in self.params]
        self.accumulation_steps = accumulation_steps
        self._backwards = [0] * len(self.params)  # backward passes since each parameter's last step
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        self._post_hooks: OrderedDict = OrderedDict()  # RemovableHandle needs a weak-referenceable dict

    def _hook(self, i: int):
        def step_param(p: torch.Tensor) -> None:
            self._backwards[i] += 1
            if self._backwards[i] < self.accumulation_steps:
                return
            self._backwards[i] = 0
            self.optimizers[i].step()
            p.grad = None

        return step_param

    @property
    def param_groups(self) -> list[dict]:
        # rebuilt on every access: an inner load_state_dict replaces its group dicts
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: opt.state[p] for opt, p in zip(self.optimizers, self.params) if p in opt.state}

    def step(self, closure=None):
        """No parameter update (each was stepped during backward); runs `closure` if given, like Optimizer.step,
        then the step post-hooks: the loop's step() comes once the backward has stepped every parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})
        return loss

    def register_step_post_hook(self, hook) -> RemovableHandle:
        """hook(optimizer, args, kwargs), called after every step(), as torch.optim.Optimizer's (a pruned
        base's masks re-zero their pruned entries there: prune/masks.MaskedParams.wrap_optimizer)."""
        handle = RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the hooks already dropped every gradient."""

    def state_dict(self) -> dict:
        return {i: opt.state_dict() for i, opt in enumerate(self.optimizers)}

    def load_state_dict(self, state_dict: dict) -> None:
        if sorted(state_dict) != list(range(len(self.optimizers))):
            raise ValueError(
                f"state_dict holds {len(state_dict)} per-parameter optimizers, "
                f"this one has {len(self.optimizers)} parameters"
            )
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(state_dict[i])

    def remove_hooks(self) -> None:
        """Detach from the parameters (ordinary backward again: gradients stay in .grad)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __repr__(self) -> str:
        return f"OptimizerInBackward({len(self.params)} parameters, inner={type(self.optimizers[0]).__name__})"


@OPTIONS.register("optim.in_backward")
class InBackward(Technique):
    """optim.in_backward=true: each parameter steps in backward, its gradient freed at once."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.optim.in_backward

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"single_process", "trainer_step", "whole_matrices"}

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"clippable", "accumulation", "gradients_in_memory"}
