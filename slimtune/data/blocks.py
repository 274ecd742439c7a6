"""Token blocks: the (N, seq_len) rows a run trains on.

`Blocks` holds them in memory (small sources, tests, and the reference packers `pack`, `pack_documents`,
`pad_documents`, which define what each data.packing gives). `TokenBlocks` computes the same rows on demand
from a memory-mapped token file (data/cache.py), so a run's data memory is its batch plus a few bytes per
block, whatever the source's size:
  stream     block b is tokens [b L, (b + 1) L)
  documents  the same slice (documents are back to back, cut at block ends); positions restart and the first
             token is no target at every segment (a document start or a block start)
  none       one row per document piece of at most L tokens holding a target, padded (position -1); its
             (start, length) index is 12 bytes a row
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimtune.data.cache import TokenFile, as_tensor
from slimtune.data.sources import IGNORE


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

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids, labels, position_ids or None) of rows `idx` (a tensor, list or slice)."""
        pos = None if self.position_ids is None else self.position_ids[idx]
        return self.input_ids[idx], self.labels[idx], pos


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


class TokenBlocks:
    """Rows of a TokenFile packed per `packing` (see the module docstring), computed per batch. `select`: the
    block numbers this view holds (a split, a recovery subset), None for all."""

    def __init__(
        self,
        tf: TokenFile,
        seq_len: int,
        packing: str,
        pad_id: int = 0,
        select: np.ndarray | None = None,
        index: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.tf, self.seq_len, self.packing, self.pad_id = tf, seq_len, packing, pad_id
        if packing == "none" and index is None:
            index = piece_index(tf, seq_len)
        self.index = index  # none: (start int64, length int32) per row
        self.select = select

    def total(self) -> int:
        if self.packing == "none":
            return len(self.index[0])
        return len(self.tf) // self.seq_len

    def __len__(self) -> int:
        return self.total() if self.select is None else len(self.select)

    def _blocks(self, idx) -> np.ndarray:
        n = len(self)
        if isinstance(idx, slice):
            blocks = np.arange(n)[idx]
        else:
            blocks = torch.as_tensor(idx).reshape(-1).numpy().astype(np.int64)
            if len(blocks) and (blocks.min() < -n or blocks.max() >= n):
                raise IndexError(f"block index out of range for {n} blocks")
            blocks = np.where(blocks < 0, blocks + n, blocks)
        return blocks if self.select is None else self.select[blocks]

    def subset(self, idx) -> "TokenBlocks":
        return TokenBlocks(self.tf, self.seq_len, self.packing, self.pad_id, self._blocks(idx), self.index)

    def lengths(self) -> torch.Tensor | None:
        if self.packing != "none":
            return None
        lengths = self.index[1] if self.select is None else self.index[1][self.select]
        return torch.from_numpy(lengths.astype(np.int64))

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        blocks = self._blocks(idx)
        L = self.seq_len
        if self.packing == "none":
            x = np.full((len(blocks), L), self.pad_id, dtype=np.int64)
            y = np.full((len(blocks), L), IGNORE, dtype=np.int64)
            p = np.full((len(blocks), L), -1, dtype=np.int64)
            for r, b in enumerate(blocks):
                start, n = int(self.index[0][b]), int(self.index[1][b])
                x[r, :n], y[r, :n], p[r, :n] = (
                    self.tf.ids(start, start + n),
                    self.tf.labels(start, start + n),
                    np.arange(n),
                )
            return as_tensor(x), as_tensor(y), as_tensor(p)
        x = np.stack([self.tf.ids(b * L, (b + 1) * L) for b in blocks]) if len(blocks) else np.zeros((0, L), np.int64)
        y = np.stack([self.tf.labels(b * L, (b + 1) * L) for b in blocks]) if len(blocks) else x.copy()
        if self.packing == "stream":
            return as_tensor(x), as_tensor(y), None
        p = np.zeros_like(x)
        for r, b in enumerate(blocks):
            start, end = b * L, (b + 1) * L
            lo, hi = np.searchsorted(self.tf.offsets, [start, end], side="left")
            segments = np.unique(np.concatenate([[start], self.tf.offsets[lo:hi]])) - start  # segment starts
            seg = np.searchsorted(segments, np.arange(L), side="right") - 1
            p[r] = np.arange(L) - segments[seg]
            y[r, segments] = IGNORE
        return as_tensor(x), as_tensor(y), as_tensor(p)

    # the whole view as tensors (small sources and tests; a run reads rows())
    @property
    def input_ids(self) -> torch.Tensor:
        return self.rows(slice(None))[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.rows(slice(None))[1]

    @property
    def position_ids(self) -> torch.Tensor | None:
        return self.rows(slice(None))[2]


def piece_index(tf: TokenFile, seq_len: int, chunk_tokens: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """data.packing=none's rows: (start, length) of every document piece of at most seq_len tokens with at
    least 2 tokens and a target after its first (pad_documents' rule), about chunk_tokens tokens at a time."""
    starts, lengths = [], []
    offsets = np.asarray(tf.offsets)
    d0 = 0
    while d0 < tf.documents:
        d1 = int(np.searchsorted(offsets, offsets[d0] + chunk_tokens, side="right")) - 1
        d1 = min(tf.documents, max(d1, d0 + 1))
        lo, hi = int(offsets[d0]), int(offsets[d1])
        doc_starts, doc_ends = offsets[d0:d1], offsets[d0 + 1 : d1 + 1]
        n_pieces = -(-(doc_ends - doc_starts) // seq_len)
        piece = np.arange(int(n_pieces.sum())) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        first = np.repeat(doc_starts, n_pieces) + seq_len * piece
        last = np.minimum(first + seq_len, np.repeat(doc_ends, n_pieces))
        targets = np.concatenate([[0], np.cumsum(tf.targets(lo, hi), dtype=np.int64)])
        has_target = targets[last - lo] - targets[np.minimum(first + 1, last) - lo] > 0
        keep = (last - first >= 2) & has_target
        starts.append(first[keep])
        lengths.append((last - first)[keep].astype(np.int32))
        d0 = d1
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(starts).astype(np.int64), np.concatenate(lengths)
