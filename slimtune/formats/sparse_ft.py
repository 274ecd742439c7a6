"""sparse_ft's `final/` (PEFT has no sparse format): what a trained SpIEL adapter is on disk.

    sparse_ft.safetensors    per wrapped module <name>: "<name>.indices" int64 (k,), flat positions r * in + c,
                             sorted and unique; "<name>.deltas" float32 (k,), W' = W + scatter(deltas)
    slimtune_adapter.json    {"format": "sparse_ft", "version": 2, "model_name": the base slimtune loads,
                             "base_model_name_or_path", "quant": the base's quantization or null,
                             "modules": {<name>: {"out_features", "in_features", "num_params"}}, "density",
                             "checksums": {file: xxh3-128} of the dir's other files}

A downloaded adapter is untrusted input: its files are verified against the checksums before any is read
(models.verify_adapter_files); version 1 (no checksums) is refused.

`slimtune eval model.name=DIR` rebuilds the base as recorded and loads this; `slimtune export RUN --merge`
adds the deltas into the full-precision weights (a plain HF model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtune.adapters.base import AdapterFormat
from slimtune.adapters.inject import adapter_modules, replace_module
from slimtune.adapters.sparse_ft import SparseFTLinear
from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir, dir_checksums, write_json
from slimtune.registry import ADAPTER_FORMATS

TENSORS, MANIFEST = "sparse_ft.safetensors", "slimtune_adapter.json"
VERSION = 2  # 2: checksums of the dir's files (1 had none)


def save_sparse_ft(
    model: nn.Module, adapter_cfg, out_dir: Path, model_name: str, base_path: str, quant: dict | None = None
) -> None:
    mods = {n: m for n, m in adapter_modules(model).items() if isinstance(m, SparseFTLinear)}
    tensors = {}
    for name, m in mods.items():
        tensors[f"{name}.indices"] = m.indices.detach().cpu().contiguous()
        tensors[f"{name}.deltas"] = m.deltas.detach().float().cpu().contiguous()
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        write_json(
            tmp / MANIFEST,
            {
                "format": "sparse_ft",
                "version": VERSION,
                "model_name": model_name,
                "base_model_name_or_path": base_path,
                "quant": quant,
                "density": adapter_cfg.density,
                "modules": {
                    n: {"out_features": m.out_features, "in_features": m.in_features, "num_params": m.num_params}
                    for n, m in mods.items()
                },
                "checksums": dir_checksums(tmp),
            },
        )


def load_sparse_ft(model: nn.Module, adapter_dir: Path) -> list[str]:
    """Wrap the modules listed in adapter_dir's manifest and load their indices and deltas; all frozen."""
    from slimtune.formats.hf import verify_adapter_files

    adapter_dir = Path(adapter_dir)
    try:
        manifest = json.loads((adapter_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"{adapter_dir / MANIFEST}: unreadable ({e}); train the adapter again") from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        got = manifest.get("version") if isinstance(manifest, dict) else None
        raise SlimtuneError(
            f"{adapter_dir / MANIFEST}: sparse_ft version {got!r}, this slimtune reads version "
            f"{VERSION} (version 1 had no checksums of the adapter's files); train the adapter again"
        )
    verify_adapter_files(adapter_dir)  # before the tensors are read
    path = adapter_dir / TENSORS
    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise SlimtuneError(
            f"{path}: cannot read the sparse_ft tensors ({e}); the adapter is missing or corrupted"
        ) from None
    names = []
    for name, spec in manifest.get("modules", {}).items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise SlimtuneError(
                f"{adapter_dir / MANIFEST}: module {name!r} is not in the base model; is "
                "model_name the model this adapter was trained on?"
            ) from None
        shape = (getattr(base, "out_features", None), getattr(base, "in_features", None))
        if shape != (spec["out_features"], spec["in_features"]):
            raise SlimtuneError(
                f"{adapter_dir / MANIFEST}: {name} is {shape} in the base but "
                f"({spec['out_features']}, {spec['in_features']}) in the adapter"
            )
        idx, deltas = state.get(f"{name}.indices"), state.get(f"{name}.deltas")
        k = spec["num_params"]
        if idx is None or deltas is None or idx.shape != (k,) or deltas.shape != (k,):
            raise SlimtuneError(f"{path}: {name}'s indices/deltas are missing or not of length {k}")
        n = spec["out_features"] * spec["in_features"]
        if k and (int(idx.min()) < 0 or int(idx.max()) >= n or not bool((idx[1:] > idx[:-1]).all())):
            raise SlimtuneError(f"{path}: {name}'s indices are not sorted, unique positions in [0, {n})")
        m = SparseFTLinear(base, num_params=k)
        with torch.no_grad():
            m.indices.copy_(idx.to(m.indices.device))
            m.deltas.copy_(deltas.to(m.deltas.device))
        replace_module(model, name, m)
        names.append(name)
    for p in model.parameters():
        p.requires_grad_(False)
    return names


ADAPTER_FORMATS.register("sparse_ft")(AdapterFormat(save=save_sparse_ft, load=load_sparse_ft))
