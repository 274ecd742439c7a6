"""The small interface features plug into the loop with (all methods optional no-ops).

A recipe names hooks in its `hooks:` list; each name is looked up in the HOOKS registry
(`@HOOKS.register("name")` on a Hooks subclass) and built with its own config section (`section` names it:
`cls(options)`), or with no arguments when it has none; the hooks run in list order,
before any passed to `trainer.run(cfg, hooks=...)`. Example: a pruning hook re-applies its masks in
`after_step` during recovery fine-tuning, saves them in `on_save` and reads them back in `on_load`, with
no change to loop.py. (An engine that replaces forward/backward/step, such as offload, plugs in at the
engine stage of model setup instead: engines/ddp.py.)
"""

from __future__ import annotations

from slimtune.technique import Technique


class Hooks(Technique):
    """A hook is a technique too: `section`, requires / withholds / validate (technique.py), and its memory for
    the planner: state_bytes(options, trainable_bytes) -> bytes it keeps for the whole run."""

    section = None

    @classmethod
    def state_bytes(cls, options, trainable_bytes: int) -> int:
        return 0

    @classmethod
    def build(cls, cfg) -> "Hooks":
        """The hook for a run of `cfg`: built with its own section when it has one."""
        return cls(getattr(cfg, cls.section)) if cls.section else cls()

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
