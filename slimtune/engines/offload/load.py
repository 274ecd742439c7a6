"""Loading a model straight into the offload store: the architecture on the meta device, each unit's weights
read from the safetensors files (pread, never memory-mapped) and written to the store one unit at a time."""

from __future__ import annotations

import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.formats.hf import DTYPES, empty_model, safetensor_files


def load_streamed(name: str, dtype: str, store, trainable: bool, quant=None, master: str = "float32") -> nn.Module:
    """The architecture of `name` on the meta device, its weights streamed tensor by tensor from the
    safetensors files into `store` (an offload UnitStore), one unit (decoder layer) at a time: no code path
    holds more than one unit. Weights that will train are stored as master weights in `master` (store unit
    `<unit>`), frozen ones in `dtype` (`<unit>~frozen`). With `quant` (a uniform slimtune format) each decoder
    layer is quantized as it passes (its codes and scales stored instead), exactly as quantize_base would.
    The resident unit (final norm, ...) is loaded into the model itself."""
    import torch

    from slimtune.engines.offload.units import materialize, split_units

    model = empty_model(name, dtype)
    files = safetensor_files(name)
    owner = {
        qname: (module, attr)
        for module_name, module in model.named_modules()
        for attr, p in module._parameters.items()
        if p is not None
        for qname in [f"{module_name}.{attr}" if module_name else attr]
    }
    quantize = quant is not None and quant.method != "none"
    headers: dict = {}
    resident: dict = {}
    target = DTYPES[master] if trainable else DTYPES[dtype]
    model.offload_store_buffers = {}  # (id(module), attr) -> the buffer's name in the store
    for unit in split_units(model):
        tensors = {}
        for qname, p in unit.params.items():
            if qname not in files:
                raise SlimtuneError(
                    f"model.name={name!r}: tensor {qname!r} is not in its safetensors files; "
                    "give a complete Hugging Face model dir"
                )
            t = read_tensor(files[qname], qname, headers)
            if tuple(t.shape) != tuple(p.shape):
                raise SlimtuneError(
                    f"{files[qname]}: tensor {qname!r} is {tuple(t.shape)}, the model's config says {tuple(p.shape)}"
                )
            # quantize_base's path: loaded in bf16, what stays unquantized cast to model.dtype afterwards
            tensors[qname] = (t.to(torch.bfloat16).to(target) if quantize else t.to(target)).contiguous()
        if unit.name == "resident":
            resident.update(tensors)
            continue
        if quantize and unit.name.startswith("layer."):
            tensors = _quantize_layer(model, unit.name, tensors, owner, quant, dtype)
        store.write_all(unit.name if trainable else f"{unit.name}~frozen", tensors)
        del tensors
    materialize(model, resident, target)
    # the store knows each parameter by its name now; adapters wrapping a linear rename it (q_proj.weight ->
    # q_proj.base.weight), so the engine finds the stored name through the parameter itself
    model.offload_store_names = {id(p): n for n, p in model.named_parameters()}
    return model


def _quantize_layer(model, unit: str, tensors: dict, owner: dict, quant, dtype: str) -> dict:
    """Quantize decoder layer `unit` (its tensors given, in bf16) in place; returns every tensor it now holds
    by qualified name: frozen params in model.dtype, the quantized linears' codes and scales."""
    from slimtune.engines.offload.units import placeholder
    from slimtune.quant import quantize_model

    layer = list(model.get_decoder().layers)[int(unit.split(".", 1)[1])]
    for qname, t in tensors.items():
        module, attr = owner[qname]
        module._parameters[attr] = nn.Parameter(t, requires_grad=False)
    quantize_model(
        layer,
        quant.method,
        backend="slimtune",
        block_size=quant.block_size,
        double_quant=quant.double_quant,
        compute_dtype=DTYPES[dtype],
    )
    prefix = {id(m): n for n, m in model.named_modules()}
    out = {}
    for local, module in layer.named_modules():
        base = prefix[id(module)]
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            t = p.detach().to(DTYPES[dtype]).contiguous()
            out[f"{base}.{attr}"] = t
            module._parameters[attr] = nn.Parameter(placeholder(tuple(t.shape), t.dtype), requires_grad=False)
        for attr, b in list(module._buffers.items()):
            if b is not None and attr not in module._non_persistent_buffers_set:
                out[f"{base}.{attr}"] = b.contiguous()
                model.offload_store_buffers[(id(module), attr)] = f"{base}.{attr}"
                module._buffers[attr] = placeholder(tuple(b.shape), b.dtype)  # in memory only when streamed in
    return out


SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


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
