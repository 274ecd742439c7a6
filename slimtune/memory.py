"""Process memory on CPU: what loading leaves behind, and glibc's heap.

- `from_pretrained` maps safetensors files and keeps weights that need no dtype change as views of the
  mapping, so every page of the file it read (the quantized linears' bf16 weights included) stays in the
  process's RSS for the whole run. `release_file_mappings` copies the few tensors still backed by a mapped
  file (embeddings, norms) into ordinary memory; the mapping is then unmapped with its last view.
- Freed heap memory below the heap's top stays resident until `malloc_trim` returns it (`trim_heap`).
Linux + glibc only; elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
import torch.nn as nn


def _file_ranges(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """[start, end) address ranges of this process's mappings of files ending in `suffix`."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(suffix):
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def release_file_mappings(model: nn.Module) -> int:
    """Copy every parameter and buffer of `model` that lives in a mapped safetensors file into ordinary
    memory (tied parameters stay tied: the Parameter object is kept, its data replaced). Returns how many."""
    ranges = _file_ranges()
    if not ranges:
        return 0

    def mapped(t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.numel() == 0:
            return False
        p = t.untyped_storage().data_ptr()
        return any(lo <= p < hi for lo, hi in ranges)

    n, seen = 0, set()
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in seen and mapped(p.data):
                seen.add(id(p))
                p.data = p.data.clone()
                n += 1
        for k, b in m._buffers.items():
            if b is not None and mapped(b):
                m._buffers[k] = b.clone()
                n += 1
    return n


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold for this process (M_MMAP_THRESHOLD): blocks of `nbytes` and more are mmap'd and
    go back to the OS when freed. glibc otherwise raises the threshold itself and keeps such blocks in the heap,
    where a churn of large temporaries fragments it. False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(-3, int(nbytes)))


def trim_heap() -> bool:
    """Return the heap's free pages to the OS (glibc malloc_trim(0)); False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
