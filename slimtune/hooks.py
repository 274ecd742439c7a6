"""The small interface features plug into the loop with (all methods optional no-ops).

A recipe names hooks in its `hooks:` list; each name is looked up in the HOOKS registry
(`@HOOKS.register("name")` on a Hooks subclass, built with no arguments) and the hooks run in list order,
before any passed to `trainer.run(cfg, hooks=...)`. Example: a pruning hook re-applies its masks in
`after_step` during recovery fine-tuning, saves them in `on_save` and reads them back in `on_load`, with
no change to loop.py. (An engine that replaces forward/backward/step, such as offload, plugs in at the
engine stage of model setup instead: engines/ddp.py.)
"""

from __future__ import annotations


class Hooks:
    def on_setup(self, model, optimizer, cfg) -> None:
        """After the model, adapters and optimizer exist, before the first step (and before on_load)."""

    def on_load(self, path, step: int) -> None:
        """On resume, after the weights and optimizer state of checkpoint `path` (at `step`) are restored."""

    def after_backward(self, model, step: int) -> None:
        """Gradients of the whole global batch are in .grad (before clipping)."""

    def before_step(self, optimizer, step: int) -> None:
        """Right before optimizer.step()."""

    def after_step(self, model, optimizer, step: int) -> None:
        """After optimizer.step() and zero_grad(); `step` counts completed steps."""

    def on_save(self, path, step: int) -> None:
        """After rank 0 wrote checkpoint `path` (every rank calls it; rank 0 should write)."""
