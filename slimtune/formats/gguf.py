"""`slimtune export SRC --format gguf --gguf-type T`: one GGUF file llama.cpp / Ollama load with no other file.

SRC: a model dir, a built-in name, a quantized checkpoint, or a run dir (its final/: a QAT run's quantized
checkpoint as it is, a full fine-tuning's model, an adapter merged into its base first). Types: f32, f16, bf16,
and llama.cpp's block types q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q6_k for the decoder's linear weights (a K type
falls back, as llama.cpp's quantizer does, to q5_0 / q8_0 for rows that are not whole 256-value blocks: the
summary's `fallback` counts them); norms and biases are f32, the embedding and output head f16 (bf16 / f32 with
those types), as they were never quantized in training.

Exact codes: a decoder linear already stored in the requested block type (`qat.method=q4_0`, `quant.method=
q4_0`) is written with its bytes as they are; any other weight is quantized by quant/ggml.py, byte for byte
llama.cpp's reference. Llama-style q / k rows are reordered to llama.cpp's rotary layout, a row permutation
that moves whole rows, hence whole blocks.
Architectures: Llama (and Mistral, same graph), Qwen2, Phi-3 (Phi3ForCausalLM: Phi-3 and Phi-4, fused qkv /
gate_up, no long-context rope scaling) and Gemma-2 (norms written as 1 + w, soft caps, sliding window); the tokenizer
must be a byte-level BPE
(tokenizer.json), written as llama.cpp's "gpt2" model with its pre-tokenizer identified by the hash llama.cpp
uses (an unknown one is written as "default", and said), or a SentencePiece-style BPE with byte fallback (Llama 2,
Mistral 7B, Phi-3-mini's tokenizer.json), written as llama.cpp's "llama" model (formats/gguf_vocab.py).
"""

from __future__ import annotations

import os
import re
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.formats.gguf_vocab import vocab_fields, write_vocab
from slimtune.quant.ggml import GGML_TYPES, GGMLFormat, GGMLLinear, quantize_ggml
from slimtune.quant.linear import FrozenQuantLinear

GGUF_TYPES = ("f32", "f16", "bf16", *GGML_TYPES)
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9}  # llama_ftype
FILE_TYPE |= {"q4_k": 14, "q6_k": 18}  # mostly Q4_K (small), mostly Q6_K
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
ARCHS["Phi3ForCausalLM"] = "phi3"  # Phi-3 / Phi-4: fused qkv and gate_up, NeoX rotary (HF's row order)
ARCHS["Gemma2ForCausalLM"] = "gemma2"  # four norms a layer, stored as 1 + w; NeoX rotary; soft caps
# per architecture, the layer names that differ from LAYER's
LAYER_OF = {
    "gemma2": {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
}
LAYER = {
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_up_proj": "ffn_up",  # gate rows first, then up: llama.cpp's phi3 graph splits it the same way
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# llama.cpp's pre-tokenizer names by the sha256 of str(tokenizer.encode(CHECK_TEXT)) (its convert_hf_to_gguf)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
}
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(module: str, arch: str = "llama") -> str | None:
    """HF module name -> GGUF tensor name stem ("model.layers.3.mlp.up_proj" -> "blk.3.ffn_up"), or None."""
    if module in TOP:
        return TOP[module]
    m = _LAYER_RE.fullmatch(module)
    layer = {**LAYER, **LAYER_OF.get(arch, {})}
    return f"blk.{m.group(1)}.{layer[m.group(2)]}" if m and m.group(2) in layer else None


def rotary_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's Llama graph wants for q / k: per head, HF's two rotary halves interleaved."""
    half = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, 2, half).transpose(1, 2).reshape(-1)


def row_order(config, arch: str, stem: str, n_rows: int) -> torch.Tensor | None:
    """The row permutation a tensor named `stem` gets in a GGUF of `arch` (Llama's q / k: rotary_rows), or None."""
    heads = {"attn_q": config.num_attention_heads}
    heads["attn_k"] = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kind = stem.rsplit(".", 1)[-1]
    return rotary_rows(n_rows, heads[kind]) if arch == "llama" and kind in heads else None


def _bytes(t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, str]:
    """A float tensor as (uint8 rows, type) for GGUFWriter's raw path (f32 / f16 / bf16 / a block type)."""
    if gguf_type in GGML_TYPES:
        fmt = GGMLFormat(gguf_type)
        return quantize_ggml(t, fmt).blocks.view(t.shape[0], -1).numpy(), fmt.stored_type(t.shape)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[gguf_type]
    data = t.detach().to(dtype).contiguous()
    return data.view(torch.uint8).view(*t.shape[:-1], -1).numpy(), gguf_type


def _tensors(model: nn.Module, gguf_type: str, arch: str) -> tuple[list, dict]:
    """(name, uint8 rows, type) per GGUF tensor, and how many linears were written from their stored codes, how
    many quantized here, and in which fallback type those whose rows are not whole K blocks went."""
    c = model.config
    side = gguf_type if gguf_type in ("f32", "bf16") else "f16"  # embedding / head: never quantized in training
    tied = getattr(c, "tie_word_embeddings", False)
    out, counts = [], {"stored_codes": 0, "quantized_here": 0, "fallback": {}}
    for module_name, module in model.named_modules():
        stem = gguf_name(module_name, arch)
        if stem is None or (stem == "output" and tied):
            continue
        order = row_order(c, arch, stem, getattr(module, "out_features", 0))
        linear = stem.startswith("blk.") and not stem.endswith("norm")
        if isinstance(module, GGMLLinear) and module.fmt.type == gguf_type:
            rows = module._packed().blocks.view(module.out_features, -1)
            stored = module.fmt.stored_type(rows.shape[:1] + (module.in_features,))
            out.append((f"{stem}.weight", (rows[order] if order is not None else rows).numpy(), stored))
            counts["stored_codes"] += 1
        else:
            w = module.dequantize_weight() if isinstance(module, FrozenQuantLinear) else module.weight.detach().float()
            w = w[order] if order is not None else w
            if w.dim() == 1:  # Gemma's norms scale by 1 + w, llama.cpp's by the weight it reads
                out.append((f"{stem}.weight", *_bytes(w + 1 if arch == "gemma2" else w, "f32")))
            else:
                out.append((f"{stem}.weight", *_bytes(w, gguf_type if linear else side)))
                counts["quantized_here"] += linear and gguf_type in GGML_TYPES
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.detach().float()
            out.append((f"{stem}.bias", *_bytes(b[order] if order is not None else b, "f32")))
    for _, _, ttype in out:
        if gguf_type in GGML_TYPES and ttype not in (gguf_type, "f32", side):
            counts["fallback"][ttype] = counts["fallback"].get(ttype, 0) + 1
    return out, counts


def pre_tokenizer(tokenizer) -> str | None:
    return PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest())


def writable(path: Path) -> Path:
    """The temporary file beside `path` a GGUF is written to first (its directory made); SlimtuneError if not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlimtuneError(f"{path}: cannot write it ({e.strerror or e}); give --out a writable path") from None
    return path.with_name(f".{path.name}.tmp")


def finish(writer, tmp: Path, path: Path) -> None:
    """Write a GGUFWriter opened on `tmp` out, then rename it to `path` (a failure leaves no partial file)."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        raise SlimtuneError(f"{path}: cannot write it ({e.strerror or e}); give --out a writable path") from None
    finally:
        tmp.unlink(missing_ok=True)


def _gemma2_keys(w, c, head_dim: int) -> None:
    """Gemma-2's own keys; llama.cpp scales queries by 1 / sqrt(head_dim) (by 1 / sqrt(hidden / heads) for its 46-layer
    27B), so another query_pre_attn_scalar is refused."""
    scalar, wide = c.query_pre_attn_scalar, c.hidden_size // c.num_attention_heads
    if scalar != head_dim and not (c.num_hidden_layers == 46 and scalar == wide):
        raise SlimtuneError(
            f"export --format gguf: llama.cpp's Gemma-2 scales queries by 1/sqrt(head_dim={head_dim}), not "
            f"query_pre_attn_scalar={scalar}; use --format hf and llama.cpp's convert_hf_to_gguf.py"
        )
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)


def write_gguf(model: nn.Module, tokenizer, path: Path, gguf_type: str, name: str = "") -> dict:
    """Write `model` (HF causal LM, its linears plain or slimtune-quantized) and `tokenizer` to the GGUF file
    `path` (atomically). Returns the export's summary."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise SlimtuneError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    arch = ARCHS.get(archs[0])
    if arch is None:
        raise SlimtuneError(
            f"export --format gguf writes {', '.join(ARCHS)} models, not {archs[0]}; use --format hf and "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    c = model.config
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":  # llama3 / longrope / yarn frequencies need tensors and keys this writer lacks
        raise SlimtuneError(
            f"export --format gguf writes the default rotary embedding, not {archs[0]}'s rope_type={rope_type}; use "
            "--format hf and llama.cpp's convert_hf_to_gguf.py"
        )
    tensors, counts = _tensors(model, gguf_type, arch)
    vocab = vocab_fields(tokenizer, c.vocab_size)
    if arch == "phi3" and "<|endoftext|>" not in vocab["tokens"]:  # else llama.cpp's loader fails on the file
        raise SlimtuneError(
            "export --format gguf: llama.cpp's Phi-3 loader looks up <|endoftext|> in the vocabulary (the Phi-3 / "
            "Phi-4 tokenizers have it) and this tokenizer lacks it; add it (tokenizer.add_special_tokens)"
        )
    pre = pre_tokenizer(tokenizer) if vocab["model"] == "gpt2" else None
    path = Path(path)
    tmp = writable(path)
    w = gguf.GGUFWriter(str(tmp), arch)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_name(name or path.stem)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", c.num_attention_heads))
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or rope["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(int(head_dim * getattr(c, "partial_rotary_factor", 1.0)))
    if arch == "gemma2":
        _gemma2_keys(w, c, head_dim)
    if arch == "phi3" and getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(len(vocab["tokens"]))
    w.add_file_type(FILE_TYPE[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, vocab, pre or "default")
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    if tokenizer.unk_token_id is not None:
        w.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
    for tname, rows, ttype in tensors:
        w.add_tensor(tname, rows, raw_dtype=getattr(gguf.GGMLQuantizationType, ttype.upper()))
    finish(w, tmp, path)
    summary = {"path": str(path), "type": gguf_type, "architecture": arch, "tokenizer": vocab["model"]}
    return {**summary, "pre_tokenizer": pre or "default", **counts}
