"""Fixed buffer pool (MemAscend): page-aligned slabs allocated once, in a few size classes sized from the
model's units, and reused for every read and write. Host memory stays flat as the model grows: a bigger
model means more units streamed through the same slabs, not more buffers.

`acquire(cls)` blocks until a slab of that class is free, which is also the engine's back-pressure: the
prefetcher cannot run further ahead than the slabs allow.
"""

from __future__ import annotations

import mmap
import threading

import torch


class Slab:
    """One aligned buffer; `view(offset, dtype, shape)` carves tensors out of it (no copy)."""

    def __init__(self, cls: str, nbytes: int):
        self.cls, self.nbytes = cls, nbytes
        self._map = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE))  # anonymous, page-aligned, lazily backed
        self.data = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]

    def view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        size = n * torch.empty((), dtype=dtype).element_size()
        if offset + size > self.nbytes:
            raise ValueError(f"slab of {self.nbytes} bytes cannot hold {size} bytes at {offset}")
        return self.data[offset : offset + size].view(dtype).view(tuple(shape))


class BufferPool:
    def __init__(self, classes: dict[str, tuple[int, int]], pin=None):
        """classes: name -> (bytes per slab, number of slabs); pin(data) page-locks a slab and returns the call
        that unlocks it (the CUDA path pins the slabs; close() unpins them)."""
        self._free = {c: [Slab(c, size) for _ in range(count)] for c, (size, count) in classes.items()}
        self._unpin = []
        if pin is not None:
            try:
                for slabs in self._free.values():
                    for slab in slabs:
                        self._unpin.append(pin(slab.data))
            except BaseException:
                self.close()
                raise
        self.sizes = {c: size for c, (size, count) in classes.items()}
        self.nbytes = sum(size * count for size, count in classes.values())
        self._cond = threading.Condition()

    def acquire(self, cls: str) -> Slab:
        with self._cond:
            while not self._free[cls]:
                self._cond.wait()
            return self._free[cls].pop()

    def try_acquire(self, cls: str) -> Slab | None:
        """A free slab of `cls`, or None at once (prefetching must never wait for a slab: the one it would
        wait for may be held by the very compute that is to run first)."""
        with self._cond:
            return self._free[cls].pop() if self._free[cls] else None

    def has_free(self, cls: str) -> bool:
        with self._cond:
            return bool(self._free[cls])

    def release(self, slab: Slab) -> None:
        with self._cond:
            self._free[slab.cls].append(slab)
            self._cond.notify_all()

    def close(self) -> None:
        """Unpin every pinned slab (no copy may be reading one: the caller synchronizes first)."""
        while self._unpin:
            self._unpin.pop()()


def slab_classes(
    units, streamed, prefetch: int, read_ahead: int, chunk: int, per_chunk: int = 2
) -> dict[str, tuple[int, int]]:
    """The pool's size classes for the offload engine's units: (slab bytes, count) per class. `streamed`: unit ->
    the names of its tensors the store holds; `chunk`: elements per optimizer-state chunk; `per_chunk`: the
    state tensors streamed per chunk (Adam's two moments, plus Kahan's buffer with bf16 masters)."""

    def size(u):
        tensors = [*u.params.items(), *((n, m._buffers[a]) for n, (m, a) in u.buffers.items())]
        return sum(-(-t.numel() * t.element_size() // 4096) * 4096 for n, t in tensors if n in streamed[u.name])

    layer = max([size(u) for u in units if u.name.startswith("layer.")] or [0])
    big = max([size(u) for u in units if u.name in ("embed", "head")] or [0])
    # layers: the one computing, `prefetch` ahead, one whose update is being written; chunks: the state
    # tensors of `read_ahead` chunks being read, one being updated, one being written
    return {
        "layer": (max(layer, 4096), prefetch + 2),
        "big": (max(big, 4096), 1),
        "chunk": (chunk * 4, per_chunk * (read_ahead + 2)),
    }
