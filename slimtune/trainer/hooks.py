"""Trainer hooks: the Hooks interface lives in slimtune/hooks.py (adapter families provide hooks too)."""

from slimtune.hooks import Hooks  # noqa: F401
