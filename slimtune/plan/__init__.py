"""`slimtune plan`: the peak memory of a run predicted from its config and the model's config.json.

arch (architecture on the meta device) -> weights, activations, optimizer (per-component counts) -> engines
(per-rank sharding, offload) -> estimate (phases, platform) -> fit (the cheapest knobs under a budget).
"""

from slimtune.plan.estimate import Plan, plan_memory

__all__ = ["Plan", "plan_memory"]
