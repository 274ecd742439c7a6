"""The load stage of model setup: `model.name` -> the base model on CPU, whatever is stored there.

A kind of model dir registered in registry.BASES with a `load(path, dtype, keep_compressed)` (a slimtune quantized
checkpoint with any LoRA factors it holds, a compressed export: formats/) when its `detect(name)` says so, else a
Hugging Face dir or built-in name (formats/hf.py). Every parameter comes back frozen; later stages decide what
trains.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimtune.formats.compressed import is_compressed_checkpoint
from slimtune.formats import compressed_io, quantized  # noqa: F401  (register their BASES loaders)
from slimtune.registry import BASES
from slimtune.errors import SlimtuneError
from slimtune.formats.hf import DTYPES, load_model


def load_base(name: str, dtype: str = "float32", keep_compressed: bool = False) -> nn.Module:
    """model.name -> the model (CPU, frozen, use_cache off); `dtype` for what is stored in full precision.
    keep_compressed: a compressed checkpoint's decoder layers stay encoded in memory (inference only)."""
    if keep_compressed and not is_compressed_checkpoint(name):
        raise SlimtuneError(
            f"model.keep_compressed=true needs a compressed checkpoint (slimtune export ... --format "
            f"dfloat11 | sparse | sparse-nf4 | sparse-int8), but model.name={name!r} is not one; "
            "drop model.keep_compressed"
        )
    for base in BASES.values():
        load = getattr(base, "load", None)
        if load is not None and base.detect(name):
            return load(Path(name).expanduser(), DTYPES[dtype], keep_compressed)
    return load_model(name, dtype)
