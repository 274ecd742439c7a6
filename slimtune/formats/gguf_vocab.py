"""A GGUF's tokenizer keys from an HF fast tokenizer (tokenizer.json), in one of llama.cpp's two BPE models:

  gpt2   byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): tokens, token types, merges; the pre-tokenizer is named by
         formats/gguf.py (PRE_TOKENIZERS)
  llama  SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B v0.1, Phi-3-mini, as transformers
         converts their tokenizer.model): pieces (with U+2581 for spaces), scores, token types
         (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte <0xNN>), add_space_prefix. llama.cpp's
         SentencePiece tokenizer merges the adjacent pair whose merged piece scores highest, so a piece's score is
         minus the rank of the first merge that makes it: merges then happen in the tokenizer's own rank order.
         Pieces no merge makes (single characters, bytes, specials) score below every merged piece.
Any other tokenizer is refused in one line (convert it with llama.cpp's convert_hf_to_gguf.py).
"""

from __future__ import annotations

import json
import re

from slimtune.errors import SlimtuneError

SPACE = "\u2581"  # SentencePiece's visible space
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _sentencepiece_style(spec: dict) -> bool:
    model = spec.get("model", {})
    steps = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and SPACE in steps


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts a space before the text (a Prepend normalizer, or Metaspace's prepend)."""
    normalizer, pre = json.dumps(spec.get("normalizer")), spec.get("pre_tokenizer") or {}
    metaspace = [p for p in [pre, *pre.get("pretokenizers", [])] if p.get("type") == "Metaspace"]
    return '"Prepend"' in normalizer or any(p.get("prepend_scheme", "always") != "never" for p in metaspace)


def vocab_fields(tokenizer, vocab_size: int) -> dict:
    """{"model": "gpt2" | "llama", "tokens", "types", and "merges" (gpt2) or "scores" + "add_space_prefix"
    (llama)}, padded to the model's vocabulary (padding: unused tokens)."""
    spec = _spec(tokenizer)
    model = spec.get("model", {})
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback")
    byte_level &= "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if not byte_level and not _sentencepiece_style(spec):
        raise SlimtuneError(
            "export --format gguf writes BPE tokenizers (byte-level: GPT-2 / Llama-3 / Qwen2 / SmolLM; or "
            "SentencePiece-style with byte fallback: Llama 2 / Mistral 7B); this model's tokenizer is neither: convert "
            "it with llama.cpp's convert_hf_to_gguf.py instead"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    kinds = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = 3 if added.get("special") else 4  # control / user-defined
    n = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        types = [kinds.get(i, 1 if i in by_id else 5) for i in range(n)]  # 1 normal, 5 unused
        return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}
    unk = model["vocab"].get(model.get("unk_token"))
    types = [kinds.get(i, 1 if i in by_id else 5) for i in range(n)]
    for i, t in enumerate(tokens):
        if i == unk:
            types[i] = 2
        elif i not in kinds and _BYTE.fullmatch(t):
            types[i] = 6
    rank = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    floor = -float(len(rank) + 1)
    scores = [(-float(rank[t]) if t in rank else floor) if types[i] == 1 else 0.0 for i, t in enumerate(tokens)]
    prefix = _space_prefix(spec)
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "add_space_prefix": prefix}


def write_vocab(writer, vocab: dict, pre: str) -> None:
    """The tokenizer keys of `vocab` (vocab_fields) on a GGUFWriter; `pre`: the gpt2 model's pre-tokenizer name."""
    writer.add_tokenizer_model(vocab["model"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["model"] == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(vocab["merges"])
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(vocab["scores"])
        writer.add_add_space_prefix(vocab["add_space_prefix"])
