"""Fixed sparsity masks during (recovery) training: pruned weights get no gradient and stay exactly 0.

Two guards, both cheap:
  1. a tensor hook on each masked parameter multiplies its gradient by the mask before it is accumulated into
     `.grad` (so DDP, gradient accumulation and optimizer-in-backward all see the masked gradient);
  2. `apply()` writes exact zeros back into the pruned entries; call it after every optimizer step, or let
     `wrap_optimizer(opt)` register it as the optimizer's step post-hook.

Why 1 alone already keeps pruned weights at 0 under AdamW: with gradients masked from the first step, the Adam
moments of pruned entries stay 0, so their update is 0 / (sqrt(0) + eps) = 0, and decoupled weight decay
w -= lr * wd * w keeps 0 at 0. Stale moments (an optimizer that ran before the masks existed) would move them,
hence `wrap_optimizer` also zeroes the param-shaped state tensors at pruned entries, and 2 is the final guarantee.
Masks are bool (True = kept), on the parameter's device: one byte per weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MaskedParams:
    """MaskedParams(model, {param name: bool mask, True = kept}); `attach()` starts enforcing them."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.model = model
        self.params = dict(model.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}
        self._set_masks(masks)
        self._handles: list = []
        self.attached = False

    @classmethod
    def from_zeros(cls, model: nn.Module, names: list[str] | None = None) -> MaskedParams:
        """Masks read off the model's current zeros (a pruned model): every >= 2-D parameter, or `names`."""
        params = dict(model.named_parameters())
        names = [n for n, p in params.items() if p.dim() >= 2] if names is None else names
        return cls(model, {n: params[n].detach() != 0 for n in names})

    def _set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        unknown = [n for n in masks if n not in self.params]
        if unknown:
            raise KeyError(f"masks for parameters the model does not have: {unknown[:5]}")
        for name, mask in masks.items():
            p = self.params[name]
            if tuple(mask.shape) != tuple(p.shape):
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
            if mask.is_floating_point():
                raise TypeError(f"mask for {name} is {mask.dtype}; give a bool (or integer 0/1) tensor")
            self.masks[name] = mask.to(device=p.device, dtype=torch.bool)

    def attach(self) -> MaskedParams:
        """Register the gradient hooks and zero the pruned entries now. Idempotent."""
        if not self.attached:
            for name in self.masks:
                if self.params[name].requires_grad:  # a frozen (e.g. LoRA base) weight only needs apply()
                    self._handles.append(self.params[name].register_hook(self._grad_hook(name)))
            self.attached = True
        self.apply()
        return self

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            # looked up at call time, so load_state_dict() on an attached instance takes effect
            return grad * self.masks[name].to(grad.device)

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.attached = False

    @torch.no_grad()
    def apply(self) -> None:
        """Set every pruned entry to exactly 0."""
        for name, mask in self.masks.items():
            self.params[name].masked_fill_(~mask, 0)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Call apply() after every optimizer.step(); zero the optimizer's param-shaped state (Adam moments) at
        pruned entries now. Returns the optimizer (the same object)."""
        self.zero_state(optimizer)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())
        return optimizer

    @torch.no_grad()
    def zero_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the state tensors shaped like their parameter (exp_avg, exp_avg_sq, momentum) at pruned entries.
        Quantized or projected states (other shapes) are left alone: apply() still guarantees the weights."""
        by_id = {id(self.params[n]): m for n, m in self.masks.items()}
        for p, state in optimizer.state.items():
            mask = by_id.get(id(p))
            if mask is None:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape and value.is_floating_point():
                    value.masked_fill_(~mask.to(value.device), 0)

    def sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per masked parameter."""
        return {n: 1.0 - m.float().mean().item() for n, m in self.masks.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{param name: uint8 mask on CPU}, ready for safetensors."""
        return {n: m.to(device="cpu", dtype=torch.uint8).contiguous() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the masks (same names required); an attached instance enforces the new ones from now on."""
        if set(state) != set(self.masks):
            missing, extra = set(self.masks) - set(state), set(state) - set(self.masks)
            raise KeyError(f"mask names differ: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        self._set_masks(state)
        if self.attached:
            self.apply()


@torch.no_grad()
def merge_masked(base_weight: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W + mask * delta in W's dtype (added in fp32): merging a LoRA update into a pruned base keeps its zeros."""
    if base_weight.shape != delta.shape or base_weight.shape != mask.shape:
        raise ValueError(
            f"shapes differ: weight {tuple(base_weight.shape)}, delta {tuple(delta.shape)}, mask {tuple(mask.shape)}"
        )
    keep = mask.to(device=base_weight.device, dtype=torch.bool)
    merged = base_weight.float() + delta.to(base_weight.device).float().masked_fill(~keep, 0)
    return merged.to(base_weight.dtype)


def hold_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> MaskedParams | None:
    """After adapters: an adapter on a pruned matrix holds the mask itself (`set_weight_mask`: LoRA's update
    becomes mask * (B A), sparse_ft's deltas stay on kept entries), a trained weight gets a MaskedParams
    (returned, attached: gradients masked); frozen ones need nothing."""
    trained = {}
    for name, mask in masks.items():
        module = model.get_submodule(name)
        if hasattr(module, "set_weight_mask"):
            module.set_weight_mask(mask)
        elif getattr(module, "weight", None) is not None and module.weight.requires_grad:
            trained[f"{name}.weight"] = mask
    if not trained:
        return None
    held = MaskedParams(model, trained)
    held.attach()
    return held
