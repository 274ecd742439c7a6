"""A pruned model dir (`slimtune prune`'s output, or a recovery run's final/ of one): a Hugging Face model dir
with its zeros stored, plus slimtune_sparse.json: method, pattern, per-matrix sparsity, the dense source model,
and the xxh3-128 checksums of the dir's files (weights, config, tokenizer), verified before any is read.
The masks are read back from the zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimtune.quant import dequantize_weight, is_quantized_linear
from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir, dir_checksums, loaded_files, manifest_path, verify_checksums, write_json
from slimtune.prune.patterns import parse_pattern, pattern_name
from slimtune.registry import BASES, DIR_VERIFIERS
from slimtune.technique import Technique

MANIFEST = "slimtune_sparse.json"
FORMAT = "slimtune-sparse"
FIX = "prune the model again with `slimtune prune`"


def save_sparse(model: nn.Module, tokenizer, out_dir, manifest: dict) -> Path:
    """Write a model dir transformers loads plus slimtune_sparse.json, atomically (a failure leaves no
    partial dir). `manifest` keys: method, pattern, sparsity (the target), scope, source_model, matrices
    (name -> achieved sparsity); the pattern is stored as a string ('unstructured', '2:4', ...). The
    manifest also holds the checksums of the dir's files (write_sparse_record)."""
    missing = [k for k in ("method", "pattern", "sparsity", "scope", "source_model", "matrices") if k not in manifest]
    if missing:
        raise ValueError(f"sparse manifest lacks {missing}")
    record = {
        "format": FORMAT,
        "version": 1,
        **manifest,
        "pattern": pattern_name(parse_pattern(manifest["pattern"])),
        "source_model": str(manifest["source_model"]),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_sparse_record(tmp, record)
    return out_dir


def write_sparse_record(model_dir, record: dict) -> None:
    """slimtune_sparse.json in a complete model dir: `record` with the xxh3-128 checksums of the dir's files
    now (weights, config, tokenizer), replacing any it carried (a recovered dir's record is its base's)."""
    model_dir = Path(model_dir)
    write_json(model_dir / MANIFEST, {**record, "checksums": dir_checksums(model_dir)})


def read_sparse_manifest(model_dir) -> dict:
    """The slimtune_sparse.json of a pruned model dir (SlimtuneError if absent, not ours, or without
    checksums of its files; the names those list are checked, the files by verify_sparse)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise SlimtuneError(f"{path}: not found; is {model_dir} a model written by `slimtune prune`?")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"{path}: unreadable ({e}); {FIX}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != 1:
        got = record if isinstance(record, dict) else {}
        raise SlimtuneError(
            f"{path}: expected format {FORMAT!r} version 1, got {got.get('format')!r} version {got.get('version')!r}"
        )
    sums = record.get("checksums")
    if not isinstance(sums, dict):
        raise SlimtuneError(
            f"{path}: no 'checksums' (written before pruned models carried checksums of their "
            f"files, or tampered with); {FIX}"
        )
    for name in sums:
        manifest_path(Path(model_dir), name, path, "checksums")
    return record


@DIR_VERIFIERS.register(MANIFEST)
def verify_sparse(model_dir) -> dict:
    """read_sparse_manifest, then every file a loader reads (weights, config, tokenizer: all but the
    manifest) listed in its checksums and matching; one line naming the first that is not."""
    model_dir = Path(model_dir)
    record = read_sparse_manifest(model_dir)
    required = sorted({"config.json", *loaded_files(model_dir)})
    verify_checksums(model_dir, record["checksums"], model_dir / MANIFEST, FIX, required)
    return record


def load_masks(model_dir, model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> keep-mask (weight != 0) of every matrix listed in model_dir's slimtune_sparse.json, read
    from `model` (the model loaded from model_dir)."""
    record = read_sparse_manifest(model_dir)
    masks = {}
    for name in record["matrices"]:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SlimtuneError(f"{Path(model_dir) / MANIFEST}: matrix {name!r} is not in the model") from None
        weight = dequantize_weight(module) if is_quantized_linear(module) else module.weight.detach()
        masks[name] = weight != 0  # a QAT run's final/ on a pruned base: its quantized linears keep the zeros
    return masks


def is_sparse_model(name: str) -> bool:
    """True for a model dir written by `slimtune prune` (or a recovery run's final/ of one)."""
    path = Path(name)
    return path.is_dir() and (path / MANIFEST).is_file()


def write_sparse_manifest(out_dir: Path, model: nn.Module, manifest: dict, **extra) -> None:
    """slimtune_sparse.json in a recovered model dir: the base's manifest with the sparsity now measured
    (and the checksums of this dir's files)."""
    matrices = {name: (model.get_submodule(name).weight == 0).float().mean().item() for name in manifest["matrices"]}
    write_sparse_record(out_dir, {**manifest, "matrices": matrices, **extra})


@BASES.register("pruned")
class PrunedBase(Technique):
    """model.name is a pruned model dir: its zeros must stay (and full fine-tuning holds masks on whole weights)."""

    detect = staticmethod(is_sparse_model)

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"exact_zero"} | ({"whole_matrices"} if cfg.adapter.type == "none" else set())

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"streamable"}  # the offload engine does not run recovery yet
