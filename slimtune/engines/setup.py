"""What an engine is given: its own sections (engine.*, and deepspeed.* / offload.* / a plugin's), and as
arguments the values of the other sections it uses. model/pipeline.py builds it from the recipe; an engine
never reads the whole RecipeConfig."""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.formats.final import FinalFormat
from slimtune.schema import EngineConfig, OptimConfig, TrainConfig


@dataclass(frozen=True)
class EngineSetup:
    engine: EngineConfig  # engine.*
    options: object  # the engine's own section (deepspeed.*, offload.*, a plugin's), or None
    train: TrainConfig  # train.*: lr, clipping, accumulation, loss chunks, activation checkpointing
    optim: OptimConfig  # optim.*
    optim_options: object  # the optimizer's own section (galore.*, sgd.*, ...), or None
    cram: object  # cram.* when optim.cram, else None
    dtype: str  # model.dtype (concrete: float32 or bfloat16)
    output_dir: str
    params: str  # where the parameters live: none | cpu | disk (engine.params, auto resolved)
    optimizer: str  # where the optimizer state lives (engine.optimizer, auto resolved)
    full: bool  # full fine-tuning (adapter.type=none)
    quant_method: str  # quant.method of the base
    final: FinalFormat  # what final/ is (formats/final.py)
