"""What the planner knows of a model without loading a weight: its config.json, its architecture built on the
meta device (every parameter's name and shape, no storage), and the sizes of the files a run reads.

`architecture(name)` is cached per model dir: `--fit` evaluates hundreds of configurations of one model.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.formats.hf import base_dir

# safetensors dtype names -> bytes per element (the file's weights, for the load stage)
SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# the linear roles of a Llama-style decoder layer (Llama, Mistral, Qwen2/3, SmolLM2, Gemma, ...)
ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Param:
    """One parameter (tied ones once): qualified name, shape, the module holding it and that module's type."""

    name: str
    shape: tuple[int, ...]
    module: str
    kind: str  # "linear" | "embedding" | "other" (norms, ...)
    layer: int | None  # decoder layer index, None outside the decoder layers

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Linear:
    name: str  # qualified module name
    in_features: int
    out_features: int
    bias: bool
    layer: int | None

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def role(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Arch:
    """Sizes of a causal LM. hidden H, intermediate I, layers L, heads / kv heads of head_dim d, vocab V."""

    model_dir: Path
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attn_impl: str
    tied: bool
    params: tuple[Param, ...]
    linears: tuple[Linear, ...]  # every nn.Linear, lm_head included
    head: str  # the output head's module name
    file_bytes: int  # bytes of the *.safetensors weights (0 when there are none)
    file_dtype_bytes: int  # bytes per element of the files' floating tensors (the most common dtype)
    tokenizer_bytes: int  # bytes of the tokenizer files (tokenizer.json, vocab, merges, ...)
    buffer_bytes: int  # the model's buffers (rotary inv_freq, ...), fp32 as built
    model: nn.Module = field(compare=False, repr=False)  # the meta-device model, for target selection

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def layer_linears(self, layer: int = 0) -> dict[str, Linear]:
        """role (q_proj, ...) -> Linear of one decoder layer."""
        return {lin.role: lin for lin in self.linears if lin.layer == layer}

    def llama_like(self) -> bool:
        """True when the decoder layers have Llama's seven projections (the activation model's exact case)."""
        return set(ATTN_ROLES + MLP_ROLES) <= set(self.layer_linears(0))


def _num(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _file_info(model_dir: Path) -> tuple[int, int]:
    """(total bytes of the safetensors files' tensors, bytes per element of their most common float dtype),
    from the files' JSON headers only."""
    total, by_dtype = 0, {}
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            continue
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            total += b - a
            by_dtype[v["dtype"]] = by_dtype.get(v["dtype"], 0) + (b - a)
    floats = {k: v for k, v in by_dtype.items() if k in ("F64", "F32", "BF16", "F16")}
    common = max(floats, key=floats.get) if floats else "F32"
    return total, SAFETENSORS_BYTES[common]


def _tokenizer_bytes(model_dir: Path) -> int:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
    return sum((model_dir / n).stat().st_size for n in names if (model_dir / n).is_file())


@functools.lru_cache(maxsize=8)
def _architecture(model_dir: Path) -> Arch:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise SlimtuneError(
            f"model.name: cannot build the architecture in {model_dir} from its config.json "
            f"({str(e).splitlines()[0]}); give a Hugging Face causal-LM dir"
        ) from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_num(text, "hidden_size", "n_embd", "d_model"))
    heads = int(_num(text, "num_attention_heads", "n_head"))
    layers_mod = getattr(model.get_decoder(), "layers", None) or getattr(model.get_decoder(), "h", None) or []
    layer_of = {}
    for i, layer in enumerate(layers_mod):
        for m in layer.modules():
            layer_of[id(m)] = i
    head_module = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    params, linears = [], []
    for mname, module in model.named_modules():
        kind = (
            "linear" if isinstance(module, nn.Linear) else "embedding" if isinstance(module, nn.Embedding) else "other"
        )
        if isinstance(module, nn.Linear):
            linears.append(
                Linear(
                    mname, module.in_features, module.out_features, module.bias is not None, layer_of.get(id(module))
                )
            )
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            params.append(
                (f"{mname}.{pname}" if mname else pname, tuple(p.shape), mname, kind, layer_of.get(id(module)), id(p))
            )
    seen, unique = set(), []
    for qname, shape, mname, kind, layer, pid in params:  # tied parameters (lm_head <-> embed_tokens) once
        if pid not in seen:
            seen.add(pid)
            unique.append(Param(qname, shape, mname, kind, layer))
    embed = model.get_input_embeddings()
    tied = head_module is not None and embed is not None and head_module.weight is embed.weight
    file_bytes, file_dtype_bytes = _file_info(model_dir)
    return Arch(
        model_dir=model_dir,
        model_type=getattr(config, "model_type", "?"),
        hidden=hidden,
        intermediate=int(_num(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        layers=len(layers_mod) or int(_num(text, "num_hidden_layers", "n_layer")),
        heads=heads,
        kv_heads=int(_num(text, "num_key_value_heads", default=heads)),
        head_dim=int(_num(text, "head_dim", default=hidden // heads)),
        vocab=int(_num(text, "vocab_size")),
        attn_impl=getattr(config, "_attn_implementation", None) or "sdpa",
        tied=tied,
        params=tuple(unique),
        linears=tuple(linears),
        head=names.get(id(head_module), "lm_head"),
        file_bytes=file_bytes,
        file_dtype_bytes=file_dtype_bytes,
        tokenizer_bytes=_tokenizer_bytes(model_dir),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        model=model,
    )


def architecture(name: str) -> Arch:
    """The Arch of `model.name` (an HF dir, a built-in name, an adapter dir's base or a quantized checkpoint)."""
    return _architecture(Path(base_dir(name)).resolve())
