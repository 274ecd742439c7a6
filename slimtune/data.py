"""Text sources -> packed (N, seq_len) token blocks, a deterministic train/eval split and batch order.

Sources: `pydoc` (Python's own `pydoc_data.topics`, no download), a `.txt` file, or a `.jsonl` file
whose lines hold `text`, or `prompt` + `response` (loss only on response tokens; prompt labels = -100).

Batch order is a pure function of (seed, step): resume needs only the step number, and the samples of
one optimizer step are the same whatever the world size (the DDP equivalence test relies on this).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError

IGNORE = -100
SPLIT_SEED = 1234  # fixed, so the eval split does not move when train.seed changes


def load_records(source: str) -> list[dict]:
    """[{'text': ...}] or [{'prompt': ..., 'response': ...}] from `data.source`."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [{"text": topics[k]} for k in sorted(topics)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlimtuneError(f"data.source={source!r}: file not found; give pydoc, a .txt or a .jsonl path")
    if path.suffix == ".txt":
        return [{"text": path.read_text(encoding="utf-8", errors="replace")}]
    if path.suffix != ".jsonl":
        raise SlimtuneError(f"data.source={source!r}: unsupported file type; use .txt or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SlimtuneError(f"{path}:{line}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimtuneError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
        ok = isinstance(rec, dict) and (isinstance(rec.get("text"), str) or
                                        (isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str)))
        if not ok:
            raise SlimtuneError(f"{path}:{n}: each line needs a 'text' string or 'prompt' and 'response' strings")
        records.append(rec)
    if not records:
        raise SlimtuneError(f"{path}: no records; one JSON object per line")
    return records


def tokenize(records: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Concatenate records (each ended by eos) into one token stream with its labels."""
    ids, labels = [], []
    eos = tokenizer.eos_token_id
    for rec in records:
        if "text" in rec:
            t = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
            ids += t
            labels += t
        else:
            p = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
            r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + [eos]
            ids += p + r
            labels += [IGNORE] * len(p) + r
    return ids, labels


@dataclass
class Blocks:
    input_ids: torch.Tensor  # (N, seq_len) int64
    labels: torch.Tensor  # (N, seq_len) int64, IGNORE where no loss

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class DataSplits:
    train: Blocks
    eval: Blocks


def pack(ids: list[int], labels: list[int], seq_len: int) -> Blocks:
    """Cut the stream into full blocks of seq_len (the ragged tail is dropped)."""
    n = len(ids) // seq_len
    x = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    y = torch.tensor(labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return Blocks(x, y)


def text_windows(source: str, tokenizer, seq_len: int) -> list[Blocks]:
    """Every non-overlapping seq_len window of the tokenized text (`slimtune eval data.source=...`): the full
    windows as one Blocks, then the shorter tail window (if it holds a target) as a (1, r) Blocks."""
    ids, labels = tokenize(load_records(source), tokenizer)
    full = pack(ids, labels, seq_len)
    out = [full] if len(full) else []
    tail = len(ids) - len(full) * seq_len
    if tail >= 2:
        out.append(pack(ids[-tail:], labels[-tail:], tail))
    if not out:
        raise SlimtuneError(f"data.source={source!r}: fewer than 2 tokens, nothing to score")
    return out


def build_splits(source: str, tokenizer, seq_len: int, eval_fraction: float) -> DataSplits:
    blocks = pack(*tokenize(load_records(source), tokenizer), seq_len)
    n = len(blocks)
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise SlimtuneError(f"data.source={source!r} gives only {n} block(s) of train.seq_len={seq_len}: "
                            "too few to split; use more text or a smaller train.seq_len")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    ev, tr = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    return DataSplits(Blocks(blocks.input_ids[tr], blocks.labels[tr]), Blocks(blocks.input_ids[ev], blocks.labels[ev]))


class BatchOrder:
    """Global sample order: epoch e is a permutation seeded by (seed, e); position p -> block index."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = [self._perm(p // self.n)[p % self.n] for p in range(start, start + count)]
        return torch.stack(out)


def micro_batch(blocks: Blocks, order: BatchOrder, step: int, micro: int, rank: int, world: int,
                batch_size: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks for (optimizer step, micro-step, rank): the step's global batch is the same set for any
    split of batch_size x grad_accum x world."""
    per_step = batch_size * grad_accum * world
    start = step * per_step + (micro * world + rank) * batch_size
    idx = order.indices(start, batch_size)
    return blocks.input_ids[idx], blocks.labels[idx]


def eval_batches(blocks: Blocks, batch_size: int, max_batches: int, rank: int = 0, world: int = 1):
    """This rank's share of the eval batches (round-robin), capped at max_batches overall (0 = all)."""
    n_batches = -(-len(blocks) // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        yield blocks.input_ids[sl], blocks.labels[sl]
