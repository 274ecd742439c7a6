"""engine.name=offload's section (offload.*) and the questions asked of it before the engine exists: is the
offload engine active (anything on disk), and does backward keep each layer's activations or recompute them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from slimtune.rules import placement
from slimtune.schema import config_section, option


@config_section("offload")
@dataclass(frozen=True)
class OffloadConfig:
    """engine.name=offload's options (where state lives: engine.params / engine.optimizer)."""

    dir: str = option(
        "a fast local disk for the store, shareable: each run uses its own subdirectory <output dir "
        "name>-<hash> (default: offload/ inside output_dir)",
        "",
    )
    prefetch: int = option("units (decoder layers) read ahead of the one computing", 2)
    io_threads: int = option("threads doing the store's reads and writes", 4)
    direct_io: bool = option("O_DIRECT reads/writes (bypass the page cache) where the file system allows", True)
    activations: str = option(
        "backward: keep each layer's activations in RAM (weights loaded again when backward "
        "reads them) | recompute each layer from its input | auto (keep when they fit in 1/16 "
        "of RAM and the streamed weights are plain)",
        "auto",
        ("auto", "keep", "recompute"),
    )


def activation_bytes(model: nn.Module, tokens: int) -> int:
    """An upper bound of what autograd saves in the decoder layers for `tokens` tokens: 12 hidden + 5
    intermediate values per token and layer (measured on Llama layers with SDPA: 10.5 h + 4.1 i), plus the
    attention matrices with eager attention, in the compute dtype."""
    c = model.config
    h, i = c.hidden_size, getattr(c, "intermediate_size", 4 * c.hidden_size)
    per_token = 12 * h + 5 * i
    if getattr(c, "_attn_implementation", "sdpa") == "eager":
        per_token += 2 * c.num_attention_heads * tokens
    size = next(model.parameters()).element_size()
    return per_token * tokens * c.num_hidden_layers * size


def keep_activations(mode: str, model: nn.Module, streamed_quantized: bool, tokens: int) -> bool:
    """offload.activations: keep (no recompute, a third less compute) or recompute each layer in backward.
    auto keeps them when they fit in 1/16 of the machine's RAM and no streamed base is quantized (its
    dequantized weights would be kept with them). tokens: a micro-batch's (train.batch_size x seq_len)."""
    if mode != "auto":
        return mode == "keep"
    if streamed_quantized:
        return False
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return activation_bytes(model, tokens) <= ram / 16


def offload_active(cfg) -> bool:
    """True for engine.name=offload with some weights or optimizer state on disk (cpu = pinned host memory:
    nothing to do on a CPU-only machine, where it equals none, and the in-memory engine runs)."""
    return cfg.engine.name == "offload" and "disk" in placement(cfg)
