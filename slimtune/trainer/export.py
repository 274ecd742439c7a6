"""`slimtune export RUN --merge`: a run's final/ merged into its base, written as a Hugging Face model dir."""

from __future__ import annotations

from pathlib import Path

from slimtune.adapters import adapter_modules, unwrap_adapters
from slimtune.config import load_config
from slimtune.errors import SlimtuneError
from slimtune.formats.hf import DTYPES, adapter_metadata, load_tokenizer
from slimtune.formats.pruned import is_sparse_model, read_sparse_manifest, write_sparse_manifest
from slimtune.formats.quantized import dequantize_to_dense, is_quantized_checkpoint
from slimtune.hardware import fixed_dtype
from slimtune.io import atomic_dir
from slimtune.model.load import load_base
from slimtune.model.quantize import quantize_stage
from slimtune.model.recovery import hold_masks, read_masks
from slimtune.registry import ADAPTER_FORMATS
from slimtune.rules import load_dtype

ONTO = ("full", "quantized")  # export --merge --onto: the full-precision base, or dequant(Q) (what was trained)


def export_merged(run_dir: Path, out_dir: Path | None = None, onto: str = "full") -> Path:
    """Merge `run_dir/final` into its base and write an HF model dir that `from_pretrained` loads.

    onto="full": a LoRA adapter is merged into the original full-precision base weights, as PEFT's
    merge_and_unload does for a re-loaded base. onto="quantized": into dequant(Q), the weights the adapter
    was trained against (the same as "full" for an unquantized run). A base quantized together with its
    factors (LQ-LoRA, LoftQ, EoRA) has only Q: both give dequant(Q) + delta."""
    if onto not in ONTO:
        raise SlimtuneError(f"export --onto {onto!r}: use one of {', '.join(ONTO)}")
    run_dir = Path(run_dir)
    final, cfg_path = run_dir / "final", run_dir / "config.yaml"
    if not cfg_path.is_file() or not final.is_dir():
        raise SlimtuneError(
            f"{run_dir}: not a finished slimtune run (needs config.yaml and final/); "
            "give the output_dir of a completed `slimtune run`"
        )
    cfg = fixed_dtype(load_config(str(cfg_path)))  # a model.dtype=auto run merges in fp32 (exact)
    out = Path(out_dir) if out_dir else run_dir / "merged"
    tokenizer = load_tokenizer(cfg.model.name)
    sparse = None  # the pruned base's manifest: the merged model keeps its masks and gets the manifest
    if is_quantized_checkpoint(str(final)):  # W = dequant(Q) + delta, dense
        model = load_base(str(final), cfg.model.dtype)
        dequantize_to_dense(model)
    elif adapter_metadata(final) is not None:
        quantized = onto == "quantized" and cfg.quant.method != "none"
        # loaded and quantized exactly as the run did, so dequant(Q) is what the adapter was trained against
        model = load_base(cfg.model.name, load_dtype(cfg) if quantized else cfg.model.dtype)
        sparse, masks = read_masks(cfg.model.name, model)
        if quantized:
            quantize_stage(model, cfg)
        ADAPTER_FORMATS.get(adapter_metadata(final)["format"]).load(model, final)
        hold_masks(model, masks)  # a pruned base: W + mask * (B A), the merged model stays sparse
        if quantized:
            dequantize_to_dense(model)  # each adapter -> nn.Linear(dequant(Q) + delta), computed in fp32
            model.to(DTYPES[cfg.model.dtype])
        else:
            for m in adapter_modules(model).values():
                m.merge(safe=True)
            unwrap_adapters(model)
    else:
        model = load_base(str(final), cfg.model.dtype)
    if sparse is None and is_sparse_model(str(final)):  # full fine-tuning of a pruned base
        sparse = read_sparse_manifest(str(final))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if sparse is not None:
            write_sparse_manifest(tmp, model, sparse, recovered_by=str(run_dir))
    return out


def _deployable(src: str, onto: str, tmp: str, fmt: str):
    """(model, model_dir, path, is_run) for a one-weight-per-linear format: a run dir's final model (a QAT run's
    quantized checkpoint as it is, an adapter merged first into `tmp`), a model dir, a built-in name or a
    quantized checkpoint."""
    path = Path(src).expanduser()
    run = _run_dir(src) is not None
    model_dir = str(path / "final") if run else src
    if run and not (path / "final" / "config.json").is_file():  # an adapter dir: merged into its base
        model_dir = str(export_merged(path, Path(tmp) / "merged", onto))
    model = load_base(model_dir, "float32")
    if adapter_modules(model):
        raise SlimtuneError(
            f"{model_dir} keeps LoRA factors beside its quantized weights; {fmt} holds one weight per linear: "
            f"merge first (slimtune export {src} --merge --out DIR), then export DIR"
        )
    return model, model_dir, path, run


def export_gguf(src: str, out: str | None, gguf_type: str, onto: str = "full") -> dict:
    """`slimtune export SRC --format gguf`: SRC's model (see _deployable) as one GGUF file (formats/gguf.py).
    out: default RUN/model-<type>.gguf, or <name>-<type>.gguf here."""
    import tempfile

    from slimtune.formats.gguf import write_gguf

    with tempfile.TemporaryDirectory(dir=_run_dir(src)) as tmp:
        model, model_dir, path, run = _deployable(src, onto, tmp, "GGUF")
        default = path / f"model-{gguf_type}.gguf" if run else Path(f"{path.name}-{gguf_type}.gguf")
        return write_gguf(model, load_tokenizer(model_dir), Path(out) if out else default, gguf_type, path.name)


def export_compressed_tensors(src: str, out: str | None, onto: str = "full") -> dict:
    """`slimtune export SRC --format compressed-tensors`: SRC's quantized model (see _deployable) in the
    compressed-tensors layout (formats/compressed_tensors.py). out: default RUN/compressed-tensors, or
    <name>-compressed-tensors here."""
    import tempfile

    from slimtune.formats.compressed_tensors import write_compressed_tensors

    with tempfile.TemporaryDirectory(dir=_run_dir(src)) as tmp:
        model, model_dir, path, run = _deployable(src, onto, tmp, "compressed-tensors")
        default = path / "compressed-tensors" if run else Path(f"{path.name}-compressed-tensors")
        return write_compressed_tensors(model, load_tokenizer(model_dir), Path(out) if out else default)


def _run_dir(src: str) -> Path | None:
    """A run dir (merges go beside it, on its disk), or None."""
    path = Path(src).expanduser()
    return path if (path / "config.yaml").is_file() and (path / "final").is_dir() else None


def export_gguf_lora(run_dir: str, out: str | None) -> dict:
    """`slimtune export RUN --format gguf-lora`: RUN/final's LoRA as a llama.cpp LoRA GGUF for the base that
    `slimtune export <model.name> --format gguf` writes (default out: RUN/adapter.gguf)."""
    from transformers import AutoConfig

    from slimtune.formats.gguf_lora import write_gguf_lora
    from slimtune.formats.hf import resolve_model_dir

    path = Path(run_dir).expanduser()
    if not (path / "config.yaml").is_file():
        raise SlimtuneError(f"{run_dir}: not a slimtune run dir (needs config.yaml and final/); give a LoRA run")
    base = load_config(str(path / "config.yaml")).model.name
    config = AutoConfig.from_pretrained(resolve_model_dir(base))
    return write_gguf_lora(path / "final", config, Path(out) if out else path / "adapter.gguf")
