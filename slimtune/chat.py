"""Conversations (`messages`: a list of {role, content}) -> token ids and labels through the tokenizer's chat
template, with the loss on the assistant turns only (`data.train_on=assistant`) or on every token (`all`).

An assistant turn's tokens are found by rendering prefixes of the conversation: the turn spans from the end of
`messages[:i]` rendered with the generation prompt to the end of `messages[:i+1]`, so whatever the template
closes a turn with (`<|im_end|>`, `</s>`, `<|eot_id|>`) is learned too. Templates that do not render a prefix of
a conversation as a prefix of its tokens are refused with a line (use `data.train_on=all`).
"""

from __future__ import annotations

from pathlib import Path

from slimtune.errors import SlimtuneError

IGNORE = -100


def set_chat_template(tokenizer, path: str) -> None:
    """`data.chat_template=PATH`: a Jinja template file replaces the tokenizer's own."""
    p = Path(path).expanduser()
    try:
        tokenizer.chat_template = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlimtuneError(f"data.chat_template={path}: cannot read it ({e}); give a Jinja template file") from None


def require_template(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SlimtuneError(
            f"data.source={source}: its 'messages' records need a chat template and the model's "
            "tokenizer has none; give one with data.chat_template=PATH (a Jinja file)"
        )


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if not isinstance(out, list):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def chat_tokens(messages: list[dict], tokenizer, train_on: str, where: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation; labels IGNORE outside the assistant turns when train_on=assistant."""
    ids = _ids(tokenizer, messages, False)
    if train_on == "all":
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _ids(tokenizer, messages[:i], True) if i else []
        end = _ids(tokenizer, messages[: i + 1], False)
        if ids[: len(start)] != start or ids[: len(end)] != end:
            raise SlimtuneError(
                f"{where}: the chat template does not render the start of this conversation as the "
                "start of its tokens, so the assistant turns cannot be located; use "
                "data.train_on=all or another data.chat_template"
            )
        labels[len(start) : len(end)] = ids[len(start) : len(end)]
    return ids, labels


def check_messages(rec: dict, where: str) -> None:
    msgs = rec.get("messages")
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
    )
    if not ok:
        raise SlimtuneError(f'{where}: \'messages\' must be a non-empty list of {{"role": str, "content": str}}')
