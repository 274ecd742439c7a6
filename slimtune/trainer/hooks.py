"""The small interface features plug into the loop with (all methods optional no-ops).

Example: an SSD offload hook prefetches optimizer state in `before_step`; a pruning hook re-applies its
masks in `after_step` during recovery fine-tuning.
"""

from __future__ import annotations


class Hooks:
    def on_setup(self, model, optimizer, cfg) -> None:
        """After the model, adapters and optimizer exist, before the first step."""

    def after_backward(self, model, step: int) -> None:
        """Gradients of the whole global batch are in .grad (before clipping)."""

    def before_step(self, optimizer, step: int) -> None:
        """Right before optimizer.step()."""

    def after_step(self, model, optimizer, step: int) -> None:
        """After optimizer.step() and zero_grad(); `step` counts completed steps."""

    def on_save(self, path, step: int) -> None:
        """After rank 0 wrote checkpoint `path`."""
