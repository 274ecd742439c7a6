"""Trainer: `run(cfg)` trains, `export_merged(run_dir)` merges a run's adapter into its base."""

from slimtune.trainer.export import export_merged  # noqa: F401
from slimtune.trainer.loop import run  # noqa: F401
