"""The offload engine's final/: written unit by unit, never the whole model in memory. A full fine-tuning's is
an HF directory of the master weights (one shard per unit); a QAT run's the quantized checkpoint its
fake-quantized linears convert to."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimtune.formats.hf import DTYPES
from slimtune.io import atomic_dir, write_json
from slimtune.quant.qat import fake_quant_modules, put_back, swap_quantized


def _store_unit(unit: str, p: nn.Parameter) -> str:
    return unit if p.requires_grad else f"{unit}~frozen"


def save_full_final(engine, path: Path, tokenizer) -> None:
    """An HF directory in optim.master_dtype (the master weights, as the in-memory engine writes them)."""
    from safetensors.torch import save_file

    streamer, dtype = engine.streamer, DTYPES[engine.setup.optim.master_dtype]
    with atomic_dir(path) as tmp:
        weight_map, shards = {}, list(streamer.units.values())
        for i, unit in enumerate(shards):
            tensors = {}
            for n, p in unit.params.items():
                if n in streamer.placeholder:
                    t = torch.empty(p.shape, dtype=p.dtype)
                    engine.store.read(_store_unit(unit.name, p), streamer.store_names[n], t).result()
                else:
                    t = p.detach().cpu()
                tensors[n] = t.to(dtype).contiguous()
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in tensors})
            del tensors
        write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        engine.model.config.torch_dtype = str(dtype).removeprefix("torch.")
        engine.model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def save_converted_final(engine, path: Path, base_path: str, tokenizer) -> None:
    """A QAT run's final/ (the quantized checkpoint): unit by unit, the weights are loaded, the unit's
    fake-quantized linears replaced by their packed quantized linears and the rest (embeddings, norms, head)
    kept as copies; then the checkpoint is written and the training modules put back. In memory at most: the
    quantized model, one unit's weights."""
    model, streamer = engine.model, engine.streamer
    fakes, swaps, held = fake_quant_modules(model), [], []
    dtype = DTYPES[engine.setup.final.qat_dtype]
    try:
        for unit in streamer.units.values():
            streamer.ensure(unit.name)
            ids = {id(p) for p in unit.params.values()}
            swaps += swap_quantized(model, {n: f for n, f in fakes.items() if id(f.weight) in ids}, dtype)
            converted_ids = {id(f.weight) for f in fakes.values() if id(f.weight) in ids}
            rest = [p for n, p in unit.params.items() if n in streamer.placeholder and id(p) not in converted_ids]
            copies = [p.data.clone() for p in rest]
            streamer.release(unit.name)
            for p, copy in zip(rest, copies):
                held.append((p, p.data))
                p.data = copy
        engine.setup.final.write(model, path, base_path, tokenizer)
    finally:
        for p, data in held:
            p.data = data
        put_back(swaps)
