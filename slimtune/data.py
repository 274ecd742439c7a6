"""Text sources -> packed (N, seq_len) token blocks, a deterministic train/eval split and batch order.

Sources: `pydoc` (Python's own `pydoc_data.topics`, no download), a `.txt` file, or records from a `.jsonl`
file, a `.parquet` file or a directory written by `datasets.save_to_disk`, each holding `text`, or `prompt`
+ `response` (loss only on response tokens; prompt labels = -100), or `messages` (a conversation, formatted
with the tokenizer's chat template: slimtune/chat.py).

Packing (`data.packing`): `documents` fills seq_len blocks with whole documents (cut at block ends), position
ids restarting at each one and no attention across them (the model builds the block-diagonal causal mask
from the position ids); `stream` cuts one token stream into blocks (positions 0..seq_len-1, attention across
documents); `none` gives each document its own row, padded (position id -1 marks padding), batches grouped
by length and trimmed to their longest row.

Batch order is a pure function of (seed, step): resume needs only the step number, and the samples of
one optimizer step are the same whatever the world size (the DDP equivalence test relies on this).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.chat import check_messages, chat_tokens, require_template, set_chat_template
from slimtune.errors import SlimtuneError

IGNORE = -100
SPLIT_SEED = 1234  # fixed, so the eval split does not move when train.seed changes


def load_records(source: str) -> list[dict]:
    """[{'text': ...}], [{'prompt': ..., 'response': ...}] or [{'messages': [...]}] from `data.source`."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [{"text": topics[k]} for k in sorted(topics)]
    path = Path(source).expanduser()
    if path.is_dir():
        return _checked(_saved_dataset_rows(path), str(path), "row")
    if not path.is_file():
        raise SlimtuneError(
            f"data.source={source!r}: file not found; give pydoc, a .txt, .jsonl or .parquet path "
            "or a datasets.save_to_disk directory"
        )
    if path.suffix == ".txt":
        return [{"text": path.read_text(encoding="utf-8", errors="replace")}]
    if path.suffix == ".parquet":
        pq = _pyarrow(source).parquet
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001  (pyarrow raises its own error types)
            raise SlimtuneError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        return _checked(rows, str(path), "row")
    if path.suffix != ".jsonl":
        raise SlimtuneError(f"data.source={source!r}: unsupported file type; use .txt, .jsonl or .parquet")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SlimtuneError(
            f"{path}:{line}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SlimtuneError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
    return _checked(records, str(path), "line", [n for n, line in enumerate(text.splitlines(), 1) if line.strip()])


def _checked(records: list, where: str, unit: str, numbers: list[int] | None = None) -> list[dict]:
    """Each record holds `text`, or `prompt` + `response`, or `messages`; else one line naming it."""
    for i, rec in enumerate(records):
        at = f"{where}:{numbers[i]}" if numbers else f"{where}: {unit} {i}"
        if isinstance(rec, dict) and "messages" in rec:
            check_messages(rec, at)
            continue
        ok = isinstance(rec, dict) and (
            isinstance(rec.get("text"), str)
            or (isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str))
        )
        if not ok:
            raise SlimtuneError(
                f"{at}: each {unit} needs a 'text' string, 'prompt' and 'response' strings, or 'messages'"
            )
    if not records:
        raise SlimtuneError(f"{where}: no records" + ("; one JSON object per line" if unit == "line" else ""))
    return records


def _pyarrow(source: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SlimtuneError(
            f"data.source={source}: reading parquet / saved datasets needs pyarrow: pip install pyarrow"
        ) from None
    return pyarrow


def _saved_dataset_rows(path: Path) -> list:
    """Rows of a `datasets.save_to_disk` dir (its Arrow stream shards; a DatasetDict: its `train` split)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise SlimtuneError(
                f"data.source={path}: a DatasetDict without a 'train' split ({splits}); give the split's directory"
            )
        path = path / "train"
    state = path / "state.json"
    if not state.is_file():
        raise SlimtuneError(
            f"data.source={path}: a directory without state.json; give a datasets.save_to_disk directory, or a file"
        )
    pa = _pyarrow(str(path))
    rows = []
    try:
        for f in json.loads(state.read_text())["_data_files"]:
            with pa.memory_map(str(path / f["filename"])) as src:
                rows += pa.ipc.open_stream(src).read_all().to_pylist()
    except (OSError, KeyError, ValueError, pa.ArrowInvalid) as e:
        raise SlimtuneError(f"data.source={path}: cannot read the saved dataset ({str(e).splitlines()[0]})") from None
    return rows


def documents(
    records: list[dict], tokenizer, train_on: str = "assistant", source: str = "?"
) -> list[tuple[list[int], list[int]]]:
    """Each record as (ids, labels): text ended by eos; prompt (no loss) + response + eos; a conversation
    through the chat template (loss on assistant turns unless train_on=all)."""
    out = []
    eos = tokenizer.eos_token_id
    for n, rec in enumerate(records):
        if "messages" in rec:
            require_template(tokenizer, source)
            out.append(chat_tokens(rec["messages"], tokenizer, train_on, f"data.source={source}: record {n}"))
        elif "text" in rec:
            t = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
            out.append((t, list(t)))
        else:
            p = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
            r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + [eos]
            out.append((p + r, (list(p) if train_on == "all" else [IGNORE] * len(p)) + r))
    return out


def tokenize(records: list[dict], tokenizer, train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """Concatenate records (each ended by eos) into one token stream with its labels."""
    ids, labels = [], []
    for i, y in documents(records, tokenizer, train_on):
        ids += i
        labels += y
    return ids, labels


@dataclass
class Blocks:
    input_ids: torch.Tensor  # (N, seq_len) int64
    labels: torch.Tensor  # (N, seq_len) int64, IGNORE where no loss
    position_ids: torch.Tensor | None = None  # (N, seq_len): None = 0..seq_len-1 everywhere; -1 = padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, idx) -> "Blocks":
        pos = None if self.position_ids is None else self.position_ids[idx]
        return Blocks(self.input_ids[idx], self.labels[idx], pos)

    def lengths(self) -> torch.Tensor | None:
        """Tokens per row when rows are padded (data.packing=none), else None."""
        if self.position_ids is None or not bool((self.position_ids < 0).any()):
            return None
        return (self.position_ids >= 0).sum(1)


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


def pack_documents(docs: list[tuple[list[int], list[int]]], seq_len: int) -> Blocks:
    """Documents back to back in full seq_len blocks (a document runs on into the next block as a new
    segment; the ragged tail is dropped); positions restart at every segment, whose first token is never a
    target (it would be predicted from the previous document)."""
    ids, labels, pos = [], [], []
    for d_ids, d_labels in docs:
        i = 0
        while i < len(d_ids):
            room = seq_len - len(ids) % seq_len
            piece = d_ids[i : i + room]
            ids += piece
            labels += [IGNORE] + d_labels[i + 1 : i + len(piece)]
            pos += range(len(piece))
            i += len(piece)
    n = len(ids) // seq_len
    x, y, p = (torch.tensor(v[: n * seq_len], dtype=torch.long).view(n, seq_len) for v in (ids, labels, pos))
    return Blocks(x, y, p)


def pad_documents(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Blocks:
    """One row per document (longer ones cut into seq_len pieces), padded to seq_len: label IGNORE and
    position -1 on the padding. Pieces without a target are dropped."""
    rows = []
    for d_ids, d_labels in docs:
        for i in range(0, len(d_ids), seq_len):
            piece, lab = d_ids[i : i + seq_len], d_labels[i : i + seq_len]
            if len(piece) >= 2 and any(v != IGNORE for v in lab[1:]):
                rows.append((piece, lab))
    x = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    p = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, (piece, lab) in enumerate(rows):
        x[r, : len(piece)] = torch.tensor(piece)
        y[r, : len(piece)] = torch.tensor(lab)
        p[r, : len(piece)] = torch.arange(len(piece))
    return Blocks(x, y, p)


def build_blocks(source: str, tokenizer, seq_len: int, packing: str = "stream", train_on: str = "assistant") -> Blocks:
    """All of `source` as blocks packed per data.packing."""
    docs = documents(load_records(source), tokenizer, train_on, source)
    if packing == "documents":
        return pack_documents(docs, seq_len)
    if packing == "none":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pad_documents(docs, seq_len, pad)
    return pack([t for d, _ in docs for t in d], [t for _, lab in docs for t in lab], seq_len)


def text_windows(source: str, tokenizer, seq_len: int, train_on: str = "assistant") -> list[Blocks]:
    """Every non-overlapping seq_len window of the tokenized text (`slimtune eval data.source=...`): the full
    windows as one Blocks, then the shorter tail window (if it holds a target) as a (1, r) Blocks."""
    ids, labels = tokenize(load_records(source), tokenizer, train_on)
    full = pack(ids, labels, seq_len)
    out = [full] if len(full) else []
    tail = len(ids) - len(full) * seq_len
    if tail >= 2:
        out.append(pack(ids[-tail:], labels[-tail:], tail))
    if not out:
        raise SlimtuneError(f"data.source={source!r}: fewer than 2 tokens, nothing to score")
    return out


def build_splits(
    source: str, tokenizer, seq_len: int, eval_fraction: float, packing: str = "stream", train_on: str = "assistant"
) -> DataSplits:
    blocks = build_blocks(source, tokenizer, seq_len, packing, train_on)
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


def splits_for(cfg, tokenizer) -> DataSplits:
    """build_splits with a RecipeConfig's data settings (data.chat_template set on the tokenizer first)."""
    d = cfg.data
    if d.chat_template:
        set_chat_template(tokenizer, d.chat_template)
    return build_splits(d.source, tokenizer, cfg.train.seq_len, d.eval_fraction, d.packing, d.train_on)


class BatchOrder:
    """Global sample order: epoch e is a permutation seeded by (seed, e); position p -> block index.
    With `lengths` (padded rows), each run of GROUP positions is sorted longest first, so a batch holds
    rows of similar length (the same for any world size: it orders positions, not ranks)."""

    GROUP = 64

    def __init__(self, n: int, seed: int, lengths: torch.Tensor | None = None):
        self.n, self.seed, self.lengths = n, seed, lengths
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            if self.lengths is not None:
                perm = torch.cat(
                    [g[torch.argsort(self.lengths[g], descending=True, stable=True)] for g in perm.split(self.GROUP)]
                )
            self._perms = {epoch: perm}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = [self._perm(p // self.n)[p % self.n] for p in range(start, start + count)]
        return torch.stack(out)


def _batch(blocks: Blocks, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, position_ids or None); padded rows trimmed to the batch's longest."""
    x, y = blocks.input_ids[idx], blocks.labels[idx]
    if blocks.position_ids is None:
        return x, y, None
    pos = blocks.position_ids[idx]
    real = (pos >= 0).any(0).nonzero()
    width = int(real[-1]) + 1 if len(real) else 1
    return x[:, :width], y[:, :width], pos[:, :width]


def micro_batch(
    blocks: Blocks, order: BatchOrder, step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int
):
    """(input_ids, labels, position_ids or None) for (optimizer step, micro-step, rank): the step's global
    batch is the same set for any split of batch_size x grad_accum x world."""
    per_step = batch_size * grad_accum * world
    start = step * per_step + (micro * world + rank) * batch_size
    return _batch(blocks, order.indices(start, batch_size))


def eval_batches(blocks: Blocks, batch_size: int, max_batches: int, rank: int = 0, world: int = 1):
    """This rank's share of the eval batches (round-robin), capped at max_batches overall (0 = all)."""
    n_batches = -(-len(blocks) // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world):
        yield _batch(blocks, slice(b * batch_size, (b + 1) * batch_size))
