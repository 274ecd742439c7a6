"""Writing and loading compressed checkpoints (formats and tensor kinds: formats/compressed.py).

`export_compressed(src, fmt, out)`: src is a model dir or a built-in name (cli.py merges a run's adapter
first, as `export --merge` does, and passes the merged dir); the sparse formats need a pruned model (its
slimtune_sparse.json names the
pruned matrices and the pattern). Prints the bytes on disk and bits per parameter against bf16 safetensors.
`load_compressed(path, dtype)` is what model/load.load_base calls, so eval, run and export all load them.

A downloaded export is untrusted input: its manifest (version 2) holds an xxh3-128 checksum of every file a
loader reads (tensors, config, tokenizer files, adapter/), and `check_export` verifies them before any is
read (models.resolve_model_dir calls it for the tokenizer and config too). A name the manifest lists must
be a relative path inside the export (io.manifest_path). Version 1 (no checksums of the tokenizer files)
is refused: export it again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtune.formats.compressed import (
    FORMATS,
    MANIFEST,
    TENSORS,
    decode_coded,
    decode_tensor,
    encode_tensor,
    is_compressed_checkpoint,
    keep_mask,
)
from slimtune.errors import SlimtuneError
from slimtune.registry import BASES, DIR_VERIFIERS
from slimtune.technique import Technique
from slimtune.io import atomic_dir, dir_checksums, loaded_files, manifest_path, verify_checksums, write_json

VERSION = 2  # 2: every file a loader reads has a checksum, tokenizer files included (1: not them)
FIX = "export it again"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
)


def dir_bytes(path: Path) -> int:
    """Bytes of a model dir (and its adapter/) without its tokenizer files."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name not in TOKENIZER_FILES)


def export_compressed(
    src: str,
    fmt: str,
    out: str | None = None,
    model_dir: Path | None = None,
    adapter_dir: Path | None = None,
    rank: int = 0,
) -> Path:
    """src: what the user named (the default --out is derived from it); model_dir: the HF dir to compress
    (default: src resolved); adapter_dir: a trained adapter (a recovery run's LoRA) kept beside the compressed
    base in full precision, in `adapter/`, instead of merged into values that are then quantized. rank > 0
    (sparse-nf4 / sparse-int8): each pruned matrix is decomposed into quantized kept values + rank-`rank`
    factors kept beside them as a LoRA adapter (formats/sparse_lowrank.py)."""
    if fmt not in FORMATS or fmt == "hf":
        raise SlimtuneError(f"export --format {fmt!r}: use one of {', '.join(FORMATS)}")
    if rank < 0 or (rank and fmt not in ("sparse-nf4", "sparse-int8")):
        raise SlimtuneError(
            f"export --rank {rank}: low-rank factors correct quantized kept values, so give --rank "
            "> 0 with --format sparse-nf4 or sparse-int8 (or --rank 0)"
        )
    if rank and adapter_dir is not None:
        raise SlimtuneError(
            "export --rank: this run has its own adapter, which is kept beside the values; drop "
            "--rank (or export its merged model: slimtune export RUN --merge, then that dir)"
        )
    from slimtune.formats.pruned import is_sparse_model, read_sparse_manifest
    from slimtune.formats.hf import load_model, load_tokenizer, verify_adapter_files

    if adapter_dir is not None:  # a run's adapter, copied in below: verified first
        verify_adapter_files(adapter_dir)
    path = Path(src).expanduser()
    out_dir = Path(out) if out else (path / fmt if path.is_dir() else Path.cwd() / f"{Path(src).name}-{fmt}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SlimtuneError(f"--out {str(out_dir)!r} is not empty; give another --out or remove it")
    t0 = time.perf_counter()
    if model_dir is None:
        from slimtune.formats.hf import resolve_model_dir

        model_dir = resolve_model_dir(src)
    sparse = read_sparse_manifest(model_dir) if is_sparse_model(str(model_dir)) else None
    if fmt != "dfloat11" and sparse is None:
        raise SlimtuneError(
            f"--format {fmt} stores pruned matrices; {src} has no slimtune_sparse.json (prune it "
            "with `slimtune prune`, or use --format dfloat11)"
        )
    model = load_model(str(model_dir), _stored_dtype(model_dir))
    nm = (
        None
        if sparse is None or sparse["pattern"] == "unstructured"
        else tuple(int(v) for v in sparse["pattern"].split(":"))
    )
    pruned = {f"{n}.weight" for n in (sparse or {}).get("matrices", {})}
    entries, records, seen, factors = {}, {}, {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in seen and seen[t.data_ptr()][1] == t.shape:  # tied: stored once
            records[name] = {"tied_to": seen[t.data_ptr()][0]}
            continue
        seen[t.data_ptr()] = (name, t.shape)
        t, keep = t.detach().cpu(), None
        if rank and name in pruned:
            t, keep, factors[name.removesuffix(".weight")] = _decompose(name, t, fmt, nm, rank)
        e, records[name] = encode_tensor(name, t, fmt, nm, name in pruned, keep)
        entries.update(e)
    if factors:
        adapter_dir = _factor_adapter(model, factors, rank, out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(entries, str(tmp / TENSORS), metadata={"format": "pt"})
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, tmp / "adapter")
            if factors:  # the factors' temporary dir
                shutil.rmtree(adapter_dir.parent, ignore_errors=True)
        model.config.save_pretrained(tmp)
        load_tokenizer(str(model_dir)).save_pretrained(tmp)
        (tmp / "model.safetensors.index.json").unlink(missing_ok=True)
        params = sum(int(torch.Size(r["shape"]).numel()) for r in records.values() if "shape" in r)
        # the source's sparse record, without the checksums of the source's files
        record = {k: v for k, v in sparse.items() if k != "checksums"} if sparse is not None else None
        manifest = {
            "format": "slimtune-compressed",
            "version": VERSION,
            "codec": fmt,
            "source": str(src),
            "tensors": records,
            "params": params,
            "pruned": record,
            "adapter": "adapter" if adapter_dir is not None else None,
            "lowrank": {
                "rank": rank,
                "error_without": sum(f["error_without"] for f in factors.values()) / len(factors),
                "error": sum(f["error"] for f in factors.values()) / len(factors),
            }
            if factors
            else None,
        }
        manifest["checksums"] = dir_checksums(tmp, ["adapter"] if adapter_dir is not None else [])
        write_json(tmp / MANIFEST, manifest)
        nbytes = dir_bytes(tmp)
        bf16 = params * 2
        write_json(
            tmp / MANIFEST,
            {**manifest, "bytes": nbytes, "bits_per_param": 8 * nbytes / params, "ratio_to_bf16": nbytes / bf16},
        )
    print(
        f"slimtune: wrote {out_dir}/ ({fmt}): {nbytes / 2**20:.1f} MiB, {8 * nbytes / params:.2f} bits/param, "
        f"{nbytes / bf16:.3f}x bf16 ({time.perf_counter() - t0:.1f}s)"
    )
    return out_dir


@DIR_VERIFIERS.register(MANIFEST)
def check_export(path: Path) -> dict:
    """The manifest of compressed export `path`, after checking it: version 2, every name it lists inside the
    dir, and every file a loader reads (tensors, config, tokenizer, adapter/) listed and matching its
    checksum. Else one line naming the file and the key; nothing is read but the manifest and the hashed files."""
    path = Path(path).expanduser()
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"{path / MANIFEST}: cannot read it ({e}); {FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "slimtune-compressed":
        raise SlimtuneError(f"{path / MANIFEST}: not a slimtune compressed checkpoint manifest; {FIX}")
    if manifest.get("version") == 1:
        raise SlimtuneError(
            f"{path / MANIFEST}: version 1, written before exports carried a checksum of every "
            f"file they load (tokenizer files included); {FIX}"
        )
    if manifest.get("version") != VERSION:
        raise SlimtuneError(
            f"{path / MANIFEST}: version {manifest.get('version')!r}, this slimtune reads version "
            f"{VERSION}; {FIX} with this slimtune"
        )
    adapter = manifest.get("adapter")
    if adapter is not None:
        manifest_path(path, adapter, path / MANIFEST, "adapter")
    if not isinstance(manifest.get("tensors"), dict):
        raise SlimtuneError(f"{path / MANIFEST}: no 'tensors' record; {FIX}")
    required = {TENSORS, "config.json", *loaded_files(path, [adapter] if adapter is not None else [])}
    verify_checksums(path, manifest.get("checksums"), path / MANIFEST, FIX, sorted(required))
    return manifest


def _decompose(name: str, t: torch.Tensor, fmt: str, nm, rank: int):
    """(values to store, keep-mask, factors) of a pruned matrix with low-rank factors beside its values."""
    from slimtune.formats.compressed import pruned_keep
    from slimtune.formats.sparse_lowrank import decompose

    if rank >= min(t.shape):
        raise SlimtuneError(f"export --rank {rank}: {name} is {tuple(t.shape)}; give a rank below {min(t.shape)}")
    keep = pruned_keep(t, nm)
    d = decompose(t, keep, fmt.removeprefix("sparse-"), rank)
    return d["values"].to(t.dtype), keep, {k: d[k] for k in ("L1", "L2", "error", "error_without")}


def _factor_adapter(model: nn.Module, factors: dict, rank: int, out_dir: Path) -> Path:
    """The decomposition's factors as a PEFT LoRA adapter (alpha = rank: scaling 1), written to a temporary
    dir beside out_dir (copied into the export as adapter/, then removed)."""
    import tempfile
    from types import SimpleNamespace

    from slimtune.adapters.inject import replace_module
    from slimtune.adapters.lora import LoRALinear
    from slimtune.formats.peft import save_peft_adapter, write_metadata

    for name, f in factors.items():
        m = replace_module(model, name, LoRALinear(model.get_submodule(name), rank, float(rank)))
        m.init_factors(f["L1"], f["L2"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-factors-"))
    save_peft_adapter(
        model, SimpleNamespace(rank=rank, alpha=float(rank), dropout=0.0), tmp / "adapter", str(out_dir), str(out_dir)
    )
    weights = tmp / "adapter" / "adapter_model.safetensors"  # stored in bf16: half the bytes of PEFT's fp32
    save_file(
        {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"}
    )
    meta = json.loads((tmp / "adapter" / "slimtune_adapter.json").read_text())
    write_metadata(tmp / "adapter", {k: v for k, v in meta.items() if k != "checksums"})  # the bf16 file's
    return tmp / "adapter"


def _stored_dtype(model_dir: Path) -> str:
    """The dtype the model dir stores (bfloat16 or float32), so the export is lossless."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return "bfloat16" if dtype == "bfloat16" else "float32"


def load_compressed(path: Path, dtype=None, keep_compressed: bool = False) -> nn.Module:
    """The model of a compressed dir: built on the meta device, each tensor decoded and assigned (in the dtype
    it was stored in, then cast to `dtype` if given). A manifest that does not match its tensors, or a file
    that does not match its checksum: one line. keep_compressed: the decoder layers' tensors stay encoded
    and are decoded layer by layer at each forward (formats/compressed_memory.py; inference only)."""
    from slimtune.formats.compressed_memory import keep_layers_compressed, split_layer_tensors
    from slimtune.formats.hf import empty_model

    path = Path(path).expanduser()
    manifest = check_export(path)  # every file below is verified before it is read
    try:
        stored = load_file(str(path / TENSORS))
    except (OSError, SafetensorError) as e:
        raise SlimtuneError(
            f"{path / TENSORS}: cannot read it ({e}); the checkpoint is truncated or corrupted; export it again"
        ) from None
    model = empty_model(str(path), "float32")
    by_name, masks = {}, {}
    grouped: dict[str, dict] = {}
    for key, v in stored.items():
        name, _, part = key.partition("::")
        grouped.setdefault(name, {})[part] = v
    layers = split_layer_tensors(model, manifest, grouped) if keep_compressed else {}
    kept = {n for tensors in layers.values() for n in tensors}
    try:
        decoded = decode_coded({n: r for n, r in manifest["tensors"].items() if n not in kept}, grouped)
    except (ValueError, KeyError, RuntimeError) as e:
        raise SlimtuneError(
            f"{path / TENSORS}: the DFloat11-coded tensors do not match {MANIFEST} ({e}); the "
            "checkpoint is corrupted or was tampered with; export it again"
        ) from None
    for name, record in manifest["tensors"].items():
        if "tied_to" in record:
            continue
        parts = grouped.get(name, {})
        try:
            keep = keep_mask(record, parts)
            if keep is not None:
                masks[name.removesuffix(".weight")] = keep
            if name in kept:
                continue
            t = decoded[name] if name in decoded else decode_tensor(name, record, parts)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SlimtuneError(
                f"{path / TENSORS}: tensor {name!r} does not match {MANIFEST} ({e}); the checkpoint "
                "is corrupted or was tampered with; export it again"
            ) from None
        by_name[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    for name, record in manifest["tensors"].items():
        if "tied_to" in record:
            by_name[name] = by_name[record["tied_to"]]
    missing = set(model.state_dict()) - set(by_name) - kept
    if missing:
        raise SlimtuneError(f"{path / MANIFEST}: no tensor for {sorted(missing)[:3]}; the checkpoint is incomplete")
    model.load_state_dict(by_name, assign=True, strict=False)
    if layers:
        keep_layers_compressed(model, layers, dtype)
    model.tie_weights()
    model.config.use_cache = False
    if manifest.get("adapter"):  # a recovery run's adapter, kept beside the compressed base
        _load_adapter(model, manifest_path(path, manifest["adapter"], path / MANIFEST, "adapter"), masks)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _load_adapter(model: nn.Module, adapter_dir: Path, masks: dict) -> None:
    """Wrap the base with the stored adapter; on pruned matrices its update stays mask * (B A), with the
    stored masks (a kept value quantized to 0 is still kept)."""
    from slimtune.prune.masks import hold_masks
    from slimtune.formats.hf import adapter_metadata
    from slimtune.registry import ADAPTER_FORMATS

    meta = adapter_metadata(adapter_dir)
    if meta is None:
        raise SlimtuneError(f"{adapter_dir}: the adapter its {MANIFEST} names is missing; export it again")
    ADAPTER_FORMATS.get(meta["format"]).load(model, adapter_dir)
    hold_masks(model, masks)


@BASES.register("compressed checkpoint")
class CompressedCheckpoint(Technique):
    """model.name is a compressed export (dfloat11 / sparse / sparse-nf4 / sparse-int8): decoded tensor by tensor
    as it loads, then a plain full-precision base."""

    detect = staticmethod(is_compressed_checkpoint)
    load = staticmethod(load_compressed)
