"""Quantized (+ low-rank) checkpoints: what `slimtune quantize` writes and `model.name=DIR` loads.

A directory with
  config.json, tokenizer files   the base model's (so the tokenizer and context length resolve as usual)
  model.safetensors              every tensor of the model: packed codes + scales of the quantized
                                 linears, LoRA factors (lora_A / lora_B), and the unquantized rest
  slimtune_quant.json            manifest: per quantized linear its class and format, per adapter its
                                 type / rank / alpha, tied tensors, achieved bits/param, allocation
Written atomically (temp dir + rename). A downloaded checkpoint is untrusted input: the manifest holds an
xxh3-128 checksum of every other file (weights, config, tokenizer), verified before any is read (a name it
lists must be a relative path inside the dir); a version-2 manifest (no checksums) is refused. Loading
checks the manifest against the tensors and names the first mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.adapters import adapter_modules
from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir, dir_checksums, loaded_files, manifest_path, verify_checksums, write_json
from slimtune.formats.hf import DTYPES, empty_model
from slimtune.quant import FrozenQuantLinear, bits_per_param, dequantize_weight, is_quantized_linear
from slimtune.registry import ADAPTERS, BASES, DIR_VERIFIERS, QUANT_FORMATS
from slimtune.technique import Technique

MANIFEST = "slimtune_quant.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 3  # 3: checksums of every file; 2: a quantized linear is {"class", "format", ...}
FIX = "re-create it with `slimtune quantize`"


def is_quantized_checkpoint(name: str) -> bool:
    return (Path(name).expanduser() / MANIFEST).is_file()


def module_spec(m: nn.Module) -> dict:
    """JSON description of a slimtune quantized linear, enough to rebuild it empty (its class and format)."""
    if not isinstance(m, FrozenQuantLinear):
        raise SlimtuneError(
            f"cannot write {type(m).__name__} to a slimtune quantized checkpoint "
            "(slimtune's own formats only; use quant.backend=slimtune)"
        )
    return m.spec()


def build_from_spec(spec: dict, compute_dtype: torch.dtype) -> nn.Module:
    """The empty module module_spec described: its class found among the registered formats."""
    classes = {cls.__name__: cls for cls in QUANT_FORMATS.values()}
    if spec.get("class") not in classes:
        raise ValueError(
            f"class {spec.get('class')!r} is not a registered quantized format ({', '.join(sorted(classes))})"
        )
    return classes[spec["class"]].from_spec(spec, compute_dtype)


def save_quantized(model: nn.Module, path: Path, tokenizer, info: dict) -> Path:
    """Write `model` (quantized linears, optionally LoRA-wrapped) to `path`. info: extra manifest fields
    (method, base_model, budget_bits, allocation, ...)."""
    from safetensors.torch import save_file

    adapters = adapter_modules(model)
    quantized = {n: m for n, m in model.named_modules() if is_quantized_linear(m)}
    state, tied, seen = {}, {}, {}
    for k, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:  # tied (e.g. lm_head <-> embed_tokens): stored once
            tied[k] = seen[key]
            continue
        seen[key] = k
        state[k] = t.detach().contiguous().cpu()
    numel = sum(m.in_features * m.out_features for m in quantized.values())
    bits = sum(bits_per_param(m) * m.in_features * m.out_features for m in quantized.values())
    manifest = {
        "format": "slimtune-quantized",
        "version": FORMAT_VERSION,
        **info,
        "bits_per_param": bits / max(numel, 1),
        "quantized": {n: module_spec(m) for n, m in quantized.items()},
        "adapters": {
            n: {
                "type": _adapter_type(m),
                "rank": m.rank,
                "alpha": m.alpha,
                **({"use_rslora": True} if getattr(m, "use_rslora", False) else {}),
            }
            for n, m in adapters.items()
        },
        "tied": tied,
    }
    with atomic_dir(Path(path)) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / MANIFEST, {**manifest, "checksums": dir_checksums(tmp)})
    return Path(path)


def _adapter_type(m: nn.Module) -> str:
    return next(name for name, cls in ADAPTERS.items() if type(m) is cls)


def read_manifest(path: Path) -> dict:
    """The manifest, its version and the names its checksums list checked (the files are not read)."""
    f = Path(path) / MANIFEST
    try:
        manifest = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlimtuneError(f"{f}: unreadable manifest ({e}); {FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "slimtune-quantized":
        raise SlimtuneError(f"{f}: not a slimtune quantized checkpoint manifest; {FIX}")
    if manifest.get("version") == 2:
        raise SlimtuneError(
            f"{f}: version 2, written before quantized checkpoints carried checksums of their files; {FIX}"
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise SlimtuneError(f"{f}: not a version-{FORMAT_VERSION} slimtune quantized checkpoint manifest; {FIX}")
    sums = manifest.get("checksums")
    for name in sums if isinstance(sums, dict) else ():
        manifest_path(Path(path), name, f, "checksums")
    return manifest


@DIR_VERIFIERS.register(MANIFEST)
def verify_quantized(path: Path) -> dict:
    """read_manifest, then every file a loader reads (weights, config, tokenizer: all but the manifest)
    listed in its checksums and matching; one line naming the first that is not."""
    path = Path(path)
    manifest = read_manifest(path)
    required = sorted({WEIGHTS, "config.json", *loaded_files(path)})
    verify_checksums(path, manifest.get("checksums"), path / MANIFEST, FIX, required)
    return manifest


def load_quantized(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model of a quantized checkpoint on CPU: quantized linears, adapters (LoRA factors), the
    rest in `dtype`; every parameter frozen. The architecture is built on the meta device and the stored
    tensors are assigned into it: no full-precision copy of the model is ever allocated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = verify_quantized(path)  # before any file of the dir is read
    model = empty_model(str(path), next(k for k, v in DTYPES.items() if v == dtype))
    # adapters first: a quantized base lives at "<adapter>.base", which exists once the adapter wraps
    for name, spec in manifest["adapters"].items():
        _replace(
            model,
            path,
            name,
            lambda old, s=spec: ADAPTERS.get(s["type"])(
                old, s["rank"], s["alpha"], use_rslora=s.get("use_rslora", False)
            ),
        )
    for name, spec in manifest["quantized"].items():
        _replace(model, path, name, lambda old, s=spec: build_from_spec(s, dtype))
    try:
        state = load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise SlimtuneError(f"{path / WEIGHTS}: unreadable ({e}); re-create it with `slimtune quantize`") from None
    for k, src in manifest.get("tied", {}).items():
        if src in state:
            state[k] = state[src]
    want = model.state_dict()
    packed = tuple(f"{name}." for name in manifest["quantized"])
    for k, t in want.items():
        if k not in state:
            raise SlimtuneError(
                f"{path / WEIGHTS}: tensor {k!r} is missing; the manifest {MANIFEST} does not "
                "match the tensors (re-create the checkpoint with `slimtune quantize`)"
            )
        castable = not k.startswith(packed) and state[k].is_floating_point() and t.is_floating_point()
        if castable and tuple(state[k].shape) == tuple(t.shape):  # the unquantized rest, in another float dtype
            state[k] = state[k].to(t.dtype)  # (a bf16 run's final/ scored in fp32)
        if tuple(state[k].shape) != tuple(t.shape) or state[k].dtype != t.dtype:
            raise SlimtuneError(
                f"{path / WEIGHTS}: tensor {k!r} is {state[k].dtype} {tuple(state[k].shape)} but "
                f"the manifest's format needs {t.dtype} {tuple(t.shape)}; the manifest {MANIFEST} "
                "does not match the tensors"
            )
    extra = sorted(set(state) - set(want))
    if extra:
        raise SlimtuneError(
            f"{path / WEIGHTS}: tensor {extra[0]!r} is not in the model the manifest {MANIFEST} "
            "describes; the manifest does not match the tensors"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    for p in model.parameters():  # frozen, factors included: the adapters stage decides what trains
        p.requires_grad_(False)
    return model


def _replace(model: nn.Module, path: Path, name: str, make) -> None:
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise SlimtuneError(
            f"{path / MANIFEST}: module {name!r} is not in the model of config.json; "
            "the manifest does not match the model"
        ) from None
    try:
        new = make(old)
    except (ValueError, KeyError, TypeError) as e:
        raise SlimtuneError(
            f"{path / MANIFEST}: module {name!r}: {e}; the manifest does not match the model "
            "(re-create the checkpoint with `slimtune quantize`)"
        ) from None
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@torch.no_grad()
def dequantize_to_dense(model: nn.Module) -> None:
    """In place: every adapter becomes an nn.Linear with W = dequant(base) + delta (merged), and every
    remaining quantized linear an nn.Linear with its dequantized weight (fp32)."""

    def dense(name: str, weight: torch.Tensor, bias) -> None:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)

    for name, m in list(adapter_modules(model).items()):
        base = m.base
        w = dequantize_weight(base) if is_quantized_linear(base) else base.weight.float()
        dense(name, w + m.delta_weight(), base.bias)
    for name, m in [(n, m) for n, m in model.named_modules() if is_quantized_linear(m)]:
        dense(name, dequantize_weight(m), m.bias)


@BASES.register("quantized checkpoint")
class QuantizedCheckpoint(Technique):
    """model.name is a slimtune quantized checkpoint: a frozen, quantized base (and its factors)."""

    detect = staticmethod(is_quantized_checkpoint)

    @staticmethod
    def load(path: Path, dtype: torch.dtype, keep_compressed: bool = False) -> nn.Module:
        return load_quantized(path, dtype)  # its manifest fixes the formats (and holds any LoRA factors)

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"trainable_base", "full_precision_linears", "streamable"}
