"""Batch order: a pure function of (seed, step), so resume needs only the step number, and the samples of one
optimizer step are the same whatever the world size (the DDP equivalence test relies on this). `blocks` is any
view with `rows(idx)`, `lengths()` and `len()` (data/blocks.py)."""

from __future__ import annotations

import torch


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


def _batch(blocks, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, position_ids or None); padded rows trimmed to the batch's longest."""
    x, y, pos = blocks.rows(idx)
    if pos is None:
        return x, y, None
    real = (pos >= 0).any(0).nonzero()
    width = int(real[-1]) + 1 if len(real) else 1
    return x[:, :width], y[:, :width], pos[:, :width]


def micro_batch(
    blocks, order: BatchOrder, step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int
):
    """(input_ids, labels, position_ids or None) for (optimizer step, micro-step, rank): the step's global
    batch is the same set for any split of batch_size x grad_accum x world."""
    per_step = batch_size * grad_accum * world
    start = step * per_step + (micro * world + rank) * batch_size
    return _batch(blocks, order.indices(start, batch_size))


def eval_batches(blocks, batch_size: int, max_batches: int, rank: int = 0, world: int = 1):
    """This rank's share of the eval batches (round-robin), capped at max_batches overall (0 = all)."""
    n_batches = -(-len(blocks) // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world):
        yield _batch(blocks, slice(b * batch_size, (b + 1) * batch_size))
