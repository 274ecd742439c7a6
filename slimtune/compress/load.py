"""The load stage of model setup: `model.name` -> the base model on CPU, whatever is stored there.

A Hugging Face dir or built-in name (models.py), or a slimtune quantized checkpoint (qcheckpoint.py, with
any LoRA factors it holds). Every parameter comes back frozen; later stages decide what trains.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimtune.compress.qcheckpoint import is_quantized_checkpoint, load_quantized
from slimtune.models import DTYPES, load_model


def load_base(name: str, dtype: str = "float32") -> nn.Module:
    """model.name -> the model (CPU, frozen, use_cache off); `dtype` for what is stored in full precision."""
    if is_quantized_checkpoint(name):  # its manifest fixes the formats (and holds any LoRA factors)
        return load_quantized(Path(name).expanduser(), DTYPES[dtype])
    return load_model(name, dtype)
