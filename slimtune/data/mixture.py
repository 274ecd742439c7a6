"""data.sources: a weighted mixture of sources, each tokenized, cached and split on its own.

The train view draws round(w_i / sum(w) x N) blocks from source i (N: all sources' train blocks together),
a seeded permutation of its blocks, repeated when the weight asks for more blocks than the source has; the
batch order then permutes the mixture like any other view. The eval view is every source's eval split, back
to back. Index: a source number and a block number per block (10 bytes)."""

from __future__ import annotations

import numpy as np
import torch


class MixtureBlocks:
    def __init__(self, parts: list, part: np.ndarray, block: np.ndarray):
        self.parts, self.part, self.block = parts, part, block

    @classmethod
    def weighted(cls, parts: list, weights: list[float], seed: int) -> "MixtureBlocks":
        total, share = sum(len(p) for p in parts), np.asarray(weights, dtype=np.float64) / sum(weights)
        part_ids, block_ids = [], []
        for i, (p, w) in enumerate(zip(parts, share)):
            want = max(1, round(w * total))
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            draws = [torch.randperm(len(p), generator=g).numpy() for _ in range(-(-want // len(p)))]
            block_ids.append(np.concatenate(draws)[:want].astype(np.int64))
            part_ids.append(np.full(want, i, dtype=np.int16))
        return cls(parts, np.concatenate(part_ids), np.concatenate(block_ids))

    @classmethod
    def concatenated(cls, parts: list) -> "MixtureBlocks":
        part = np.concatenate([np.full(len(p), i, dtype=np.int16) for i, p in enumerate(parts)])
        block = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
        return cls(parts, part, block)

    def __len__(self) -> int:
        return len(self.part)

    def _select(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            return np.arange(len(self))[idx]
        return torch.as_tensor(idx).reshape(-1).numpy().astype(np.int64)

    def subset(self, idx) -> "MixtureBlocks":
        sel = self._select(idx)
        return MixtureBlocks(self.parts, self.part[sel], self.block[sel])

    def lengths(self) -> torch.Tensor | None:
        per_part = [p.lengths() for p in self.parts]
        if any(x is None for x in per_part):
            return None
        out = np.empty(len(self), dtype=np.int64)
        for i, lengths in enumerate(per_part):
            mine = self.part == i
            out[mine] = lengths.numpy()[self.block[mine]]
        return torch.from_numpy(out)

    def rows(self, idx):
        sel = self._select(idx)
        out, order = [], []
        for i, p in enumerate(self.parts):
            where = np.nonzero(self.part[sel] == i)[0]
            if len(where):
                out.append(p.rows(torch.from_numpy(self.block[sel][where])))
                order.append(where)
        if not out:
            return self.parts[0].rows(torch.zeros(0, dtype=torch.long))
        back = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable"))
        x, y = torch.cat([o[0] for o in out])[back], torch.cat([o[1] for o in out])[back]
        pos = None if out[0][2] is None else torch.cat([o[2] for o in out])[back]
        return x, y, pos

    @property
    def input_ids(self) -> torch.Tensor:
        return self.rows(slice(None))[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.rows(slice(None))[1]

    @property
    def position_ids(self) -> torch.Tensor | None:
        return self.rows(slice(None))[2]
