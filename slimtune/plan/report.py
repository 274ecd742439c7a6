"""report.json's `planned_peak_memory_bytes`: the planner's prediction for the run, beside the measured peak.

The training loop calls `planned_peak` once the model and engine are built and puts it in the report; the
prediction is made from the resolved config. A planner failure never fails a run: it is logged on stderr and
the field is null.
"""

from __future__ import annotations

import sys


def planned_peak(cfg, world: int, device: str) -> int | None:
    """The predicted peak of cfg's run per rank, or None (logged) when the planner fails."""
    try:
        from slimtune.plan.estimate import plan_memory

        return int(plan_memory(cfg, world, device).peak_memory_bytes)
    except Exception as e:  # noqa: BLE001  (any planner bug must leave the run alone)
        print(f"slimtune: plan: no planned peak for report.json ({type(e).__name__}: {e})", file=sys.stderr)
        return None
