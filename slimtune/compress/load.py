"""The load stage of model setup: `model.name` -> the base model on CPU, whatever is stored there.

A Hugging Face dir or built-in name (models.py), or a slimtune quantized checkpoint (qcheckpoint.py, with
any LoRA factors it holds). Every parameter comes back frozen; later stages decide what trains.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimtune.compress.qcheckpoint import is_quantized_checkpoint, load_quantized
from slimtune.errors import SlimtuneError
from slimtune.models import DTYPES, empty_model, load_model, safetensor_files


def load_base(name: str, dtype: str = "float32") -> nn.Module:
    """model.name -> the model (CPU, frozen, use_cache off); `dtype` for what is stored in full precision."""
    if is_quantized_checkpoint(name):  # its manifest fixes the formats (and holds any LoRA factors)
        return load_quantized(Path(name).expanduser(), DTYPES[dtype])
    return load_model(name, dtype)


def load_streamed(name: str, dtype: str, store, trainable: bool) -> nn.Module:
    """The architecture of `name` on the meta device, its weights streamed tensor by tensor from the
    memory-mapped safetensors files into `store` (an offload UnitStore), one unit (decoder layer) at a
    time: no code path holds more than one unit. Weights that will train are stored as fp32 master weights
    (store unit `<unit>`), frozen ones in `dtype` (`<unit>~frozen`). The resident unit (final norm, ...) is
    loaded into the model itself. Returns the model (streamed parameters still on meta)."""
    import torch

    from slimtune.offload.units import materialize, split_units

    model = empty_model(name, dtype)
    files = safetensor_files(name)
    headers: dict = {}
    resident: dict = {}
    target = torch.float32 if trainable else DTYPES[dtype]
    for unit in split_units(model):
        tensors = {}
        for qname, p in unit.params.items():
            if qname not in files:
                raise SlimtuneError(f"model.name={name!r}: tensor {qname!r} is not in its safetensors files; "
                                    "give a complete Hugging Face model dir")
            t = read_tensor(files[qname], qname, headers)
            if tuple(t.shape) != tuple(p.shape):
                raise SlimtuneError(f"{files[qname]}: tensor {qname!r} is {tuple(t.shape)}, the model's config "
                                    f"says {tuple(p.shape)}")
            tensors[qname] = t.to(target).contiguous()
        if unit.name == "resident":
            resident.update(tensors)
            continue
        store.write_all(unit.name if trainable else f"{unit.name}~frozen", tensors)
    materialize(model, resident, target)
    # the store knows each parameter by its name now; adapters wrapping a linear rename it (q_proj.weight ->
    # q_proj.base.weight), so the engine finds the stored name through the parameter itself
    model.offload_store_names = {id(p): n for n, p in model.named_parameters()}
    return model


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_tensor(path, name: str, headers: dict):
    """One tensor of a .safetensors file, read with pread into a fresh tensor. Not memory-mapped: a mapping's
    touched pages count in the process's RSS until unmapped, which for a multi-GB shard is its whole size."""
    import json
    import os
    import struct

    import torch

    path = str(path)
    if path not in headers:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            headers[path] = (8 + n, json.loads(f.read(n)))
    base, header = headers[path]
    meta = header[name]
    start, stop = meta["data_offsets"]
    dtype = getattr(torch, SAFETENSORS_DTYPES[meta["dtype"]])
    out = torch.empty(meta["shape"], dtype=dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < stop - start:
            got = os.preadv(fd, [view[done:]], base + start + done)
            if got == 0:
                raise SlimtuneError(f"{path}: truncated at tensor {name!r}; the safetensors file is incomplete")
            done += got
    finally:
        os.close(fd)
    return out
