"""Trainer: `run(cfg)` trains, `evaluate(cfg)` reports perplexity, `export_merged(run_dir)` merges."""

from slimtune.trainer.loop import run  # noqa: F401
from slimtune.trainer.save import export_merged  # noqa: F401
