"""`slimtune generate`: a continuation of one prompt (or conversation) from any model slimtune trains or
writes, built as `slimtune eval` builds it (model/pipeline.build_for_eval): an HF dir or built-in name, a
quantized or compressed checkpoint, an adapter dir on its rebuilt (quantized) base, or a run dir (its final/).

Generation arguments are undotted (prompt=, messages=, max_new_tokens=, temperature=, top_p=, seed=), config
keys dotted (model.name=, model.dtype=, data.chat_template= for a template file). The decoding loop runs the HF
model's forward with its KV cache:
greedy at temperature=0, else temperature + nucleus (top_p) sampling from a generator seeded with `seed`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.chat import set_chat_template
from slimtune.formats.compressed_memory import to_device
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.hardware import fixed_dtype
from slimtune.formats.hf import context_length, load_tokenizer
from slimtune.engines.dist import pick_device
from slimtune.model.pipeline import build_for_eval

DEFAULTS = {"prompt": None, "messages": None, "max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def split_args(args: list[str]) -> tuple[dict, list[str]]:
    """(generation arguments, dotted config overrides). `prompt` is taken literally (never YAML-parsed)."""
    gen, overrides = dict(DEFAULTS), []
    for item in args:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f'argument {item!r} must look like key=value (e.g. prompt="Hello" or model.name=DIR)')
        if "." in key:
            overrides.append(item)
            continue
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, list(DEFAULTS), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(DEFAULTS)}"
            raise ConfigError(f"unknown generate argument '{key}'; {hint} (config keys are dotted, e.g. model.name=)")
        gen[key] = value if key in ("prompt", "messages") else _number(key, value, type(DEFAULTS[key]))
    if (gen["prompt"] is None) == (gen["messages"] is None):
        raise ConfigError("give exactly one of prompt=TEXT or messages=FILE.json")
    if gen["max_new_tokens"] < 1:
        raise ConfigError(f"max_new_tokens={gen['max_new_tokens']} must be >= 1")
    if gen["temperature"] < 0:
        raise ConfigError(f"temperature={gen['temperature']} must be >= 0 (0: greedy)")
    if not 0 < gen["top_p"] <= 1:
        raise ConfigError(f"top_p={gen['top_p']} must be in (0, 1]")
    return gen, overrides


def _number(key: str, text: str, tp):
    try:
        return tp(text.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {tp.__name__}") from None


def read_messages(path: str) -> list[dict]:
    """messages=FILE: a JSON list of {role, content} (or an object with such a list under "messages")."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"messages={path}: cannot read it as JSON ({e})") from None
    if isinstance(data, dict):
        data = data.get("messages")
    ok = (
        isinstance(data, list)
        and data
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] and isinstance(m.get("content"), str)
            for m in data
        )
    )
    if not ok:
        raise ConfigError(
            f'messages={path}: expected a non-empty JSON list of {{"role": ..., "content": ...}} '
            "objects with string values"
        )
    return data


def prompt_ids(tokenizer, gen: dict, name: str) -> list[int]:
    """The prompt's token ids: one user message (or the conversation) under the tokenizer's chat template
    with the generation prompt added; a raw prompt when the tokenizer has no template."""
    template = getattr(tokenizer, "chat_template", None)
    if gen["messages"] is not None:
        messages = read_messages(gen["messages"])
        if not template:
            raise ConfigError(
                f"messages={gen['messages']}: the tokenizer of model.name={name!r} has no chat "
                "template; use prompt=TEXT (used raw, without a template)"
            )
    elif template:
        messages = [{"role": "user", "content": gen["prompt"]}]
    else:
        return list(tokenizer(gen["prompt"])["input_ids"])
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(out, list):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokenizer's eos and every eos id of the model's generation config (chat end-of-turn tokens)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids if i is not None}


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy (temperature 0), else a sample of softmax(logits / temperature) cut to its top_p nucleus."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    if top_p < 1:
        sorted_p[(sorted_p.cumsum(0) - sorted_p) >= top_p] = 0  # the most likely token always stays
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


@torch.no_grad()
def decode(
    model: nn.Module,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop: set[int],
    device: torch.device,
) -> list[int]:
    """New token ids (the stop token excluded), one forward per token on the KV cache."""
    generator = torch.Generator().manual_seed(seed)
    # transformers >= 5.25 names the KV cache `cache`, earlier `past_key_values`
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    x, past, out = torch.tensor([ids], device=device), None, []
    for _ in range(max_new_tokens):
        o = model(input_ids=x, use_cache=True, **{arg: past})  # cache on (slimtune loads models with it off)
        past = o[arg]
        tok = next_token(o.logits[0, -1], temperature, top_p, generator)
        if tok in stop:
            break
        out.append(tok)
        x = torch.tensor([[tok]], device=device)
    return out


def _model_name(name: str) -> str:
    """A run dir (config.yaml + final/) stands for its final/ model."""
    path = Path(name).expanduser()
    return str(path / "final") if (path / "config.yaml").is_file() and (path / "final").is_dir() else name


def generate(cfg, gen: dict, log=print) -> str:
    """The decoded continuation (special tokens skipped). model.dtype=auto not resolved by the command line
    computes in fp32, so greedy output matches transformers on the merged model."""
    cfg = fixed_dtype(cfg)
    name = _model_name(cfg.model.name)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name))
    device = pick_device(cfg.train.device)
    tokenizer = load_tokenizer(name)
    if cfg.data.chat_template:  # the template a run trained with (data.chat_template=PATH)
        set_chat_template(tokenizer, cfg.data.chat_template)
    ids = prompt_ids(tokenizer, gen, name)
    room = context_length(name) - len(ids)
    if room < 1:
        raise SlimtuneError(f"the prompt has {len(ids)} tokens, the model's context {len(ids) + room}: shorten it")
    t0 = time.perf_counter()
    model = to_device(build_for_eval(cfg), device)  # a keep_compressed model stays encoded on the device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16"):
        new = decode(
            model,
            ids,
            min(gen["max_new_tokens"], room),
            gen["temperature"],
            gen["top_p"],
            gen["seed"],
            stop_ids(model, tokenizer),
            device,
        )
    log(
        f"slimtune: generated {len(new)} tokens after a {len(ids)}-token prompt ({name}, {cfg.model.dtype}, "
        f"{time.perf_counter() - t0:.1f}s)"
    )
    return tokenizer.decode(new, skip_special_tokens=True)
