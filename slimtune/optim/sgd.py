"""SGD (torch's), with momentum from its own section."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimtune.optim.adamw import _state_bits_32
from slimtune.optim.memory import STEP_RATE
from slimtune.registry import OPTIMIZERS
from slimtune.schema import config_section, option
from slimtune.technique import declares


@config_section("sgd")
@dataclass(frozen=True)
class SGDConfig:
    """optim.name=sgd's options."""

    momentum: float = option("SGD momentum", 0.0)


def _sgd_state_bytes(optim, options, name: str, shape) -> int:
    return 4 * math.prod(shape) if options.momentum else 0  # the momentum buffer


def _sgd_step_bytes(optim, options, name: str, shape) -> float:
    return STEP_RATE["other" if options.momentum else "sgd"] * math.prod(shape)


@OPTIMIZERS.register("sgd")
@declares(validate=_state_bits_32, section="sgd", state_bytes=_sgd_state_bytes, step_bytes=_sgd_step_bytes)
def build_sgd(optim, options: SGDConfig, named, lr):
    return torch.optim.SGD([p for _, p in named], lr=lr, momentum=options.momentum, weight_decay=optim.weight_decay)
