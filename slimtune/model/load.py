"""The load stage of model setup: `model.name` -> the base model on CPU, whatever is stored there.

A Hugging Face dir or built-in name (formats/hf.py), or a slimtune quantized checkpoint (formats/quantized.py, with
any LoRA factors it holds). Every parameter comes back frozen; later stages decide what trains.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimtune.formats.compressed import is_compressed_checkpoint
from slimtune.formats.compressed_io import load_compressed
from slimtune.formats.quantized import is_quantized_checkpoint, load_quantized
from slimtune.errors import SlimtuneError
from slimtune.formats.hf import DTYPES, load_model


def load_base(name: str, dtype: str = "float32", keep_compressed: bool = False) -> nn.Module:
    """model.name -> the model (CPU, frozen, use_cache off); `dtype` for what is stored in full precision.
    keep_compressed: a compressed checkpoint's decoder layers stay encoded in memory (inference only)."""
    if keep_compressed and not is_compressed_checkpoint(name):
        raise SlimtuneError(f"model.keep_compressed=true needs a compressed checkpoint (slimtune export ... --format "
                            f"dfloat11 | sparse | sparse-nf4 | sparse-int8), but model.name={name!r} is not one; "
                            "drop model.keep_compressed")
    if is_quantized_checkpoint(name):  # its manifest fixes the formats (and holds any LoRA factors)
        return load_quantized(Path(name).expanduser(), DTYPES[dtype])
    if is_compressed_checkpoint(name):  # dfloat11 / sparse / sparse-nf4: decoded tensor by tensor
        return load_compressed(Path(name), DTYPES[dtype], keep_compressed)
    return load_model(name, dtype)
