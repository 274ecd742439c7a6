"""A source -> the train / eval blocks of a run: tokenized once into the cache (data/cache.py), packed on
demand (data/blocks.py), split by a fixed seed so the eval split does not move when train.seed changes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.chat import set_chat_template
from slimtune.data.blocks import Blocks, TokenBlocks, pack
from slimtune.data.cache import token_file
from slimtune.errors import SlimtuneError

SPLIT_SEED = 1234  # fixed, so the eval split does not move when train.seed changes


@dataclass
class DataSplits:
    train: object  # Blocks or TokenBlocks
    eval: object


def build_blocks(
    source: str,
    tokenizer,
    seq_len: int,
    packing: str = "stream",
    train_on: str = "assistant",
    cache_dir: str | None = None,
    progress: bool = True,
    num_proc: int = 0,
) -> TokenBlocks:
    """All of `source` as blocks packed per data.packing, over its cached token file."""
    tf = token_file(source, tokenizer, train_on, cache_dir, progress, num_proc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenBlocks(tf, seq_len, packing, pad)


def text_windows(
    source: str, tokenizer, seq_len: int, train_on: str = "assistant", cache_dir: str | None = None
) -> list:
    """Every non-overlapping seq_len window of the tokenized text (`slimtune eval data.source=...`): the full
    windows as one view, then the shorter tail window (if it holds a target) as a (1, r) Blocks."""
    tf = token_file(source, tokenizer, train_on, cache_dir)
    full = TokenBlocks(tf, seq_len, "stream")
    out = [full] if len(full) else []
    tail = len(tf) - len(full) * seq_len
    if tail >= 2:
        out.append(pack(tf.ids(len(tf) - tail, len(tf)).tolist(), tf.labels(len(tf) - tail, len(tf)).tolist(), tail))
    if not out:
        raise SlimtuneError(f"data.source={source!r}: fewer than 2 tokens, nothing to score")
    return out


def split(blocks, source: str, seq_len: int, eval_fraction: float) -> DataSplits:
    n = len(blocks)
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise SlimtuneError(
            f"data.source={source!r} gives only {n} block(s) of train.seq_len={seq_len}: "
            "too few to split; use more text or a smaller train.seq_len"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    ev, tr = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    return DataSplits(blocks.subset(tr), blocks.subset(ev))


def build_splits(
    source: str,
    tokenizer,
    seq_len: int,
    eval_fraction: float,
    packing: str = "stream",
    train_on: str = "assistant",
    cache_dir: str | None = None,
    progress: bool = True,
    num_proc: int = 0,
) -> DataSplits:
    blocks = build_blocks(source, tokenizer, seq_len, packing, train_on, cache_dir, progress, num_proc)
    return split(blocks, source, seq_len, eval_fraction)


BYTES_PER_TOKEN = 3.0  # a text source's bytes per token, for a plan made before its cache exists (English BPE: 3-4)
TOKENS_PER_DOCUMENT = 256  # likewise, for its document index


def resident_bytes(source: str, seq_len: int, packing: str) -> int:
    """A run's resident data memory, without tokenizing: the split and batch order (8 bytes a block each, the
    train and eval selections 8 more), packing=none's row index (12 bytes a row) and the document offsets (8
    bytes a document). The tokens stay on disk (read block by block). Sizes from the file's bytes."""
    import os

    try:
        size = os.path.getsize(os.path.expanduser(source))
    except OSError:
        return 0
    tokens = size / 2 if source.endswith(".bin") else size / BYTES_PER_TOKEN
    blocks = tokens / seq_len if packing != "none" else tokens / min(seq_len, TOKENS_PER_DOCUMENT)
    return int(24 * blocks + (12 * blocks if packing == "none" else 0) + 8 * tokens / TOKENS_PER_DOCUMENT)


def splits_for(cfg, tokenizer) -> DataSplits:
    """build_splits with a RecipeConfig's data settings (data.chat_template set on the tokenizer first)."""
    d = cfg.data
    if d.chat_template:
        set_chat_template(tokenizer, d.chat_template)
    if d.sources:  # a mixture: each source cached and split on its own, train blocks drawn by weight
        from slimtune.data.mixture import MixtureBlocks

        parts = [
            build_splits(
                p["source"],
                tokenizer,
                cfg.train.seq_len,
                d.eval_fraction,
                d.packing,
                d.train_on,
                d.cache_dir or None,
                cfg.logging.progress,
                d.num_proc,
            )
            for p in d.sources
        ]
        weights = [float(p.get("weight", 1.0)) for p in d.sources]
        return DataSplits(
            MixtureBlocks.weighted([s.train for s in parts], weights, cfg.train.seed),
            MixtureBlocks.concatenated([s.eval for s in parts]),
        )
    return build_splits(
        d.source,
        tokenizer,
        cfg.train.seq_len,
        d.eval_fraction,
        d.packing,
        d.train_on,
        d.cache_dir or None,
        cfg.logging.progress,
        d.num_proc,
    )


__all__ = ["Blocks", "DataSplits", "SPLIT_SEED", "build_blocks", "build_splits", "split", "splits_for", "text_windows"]
