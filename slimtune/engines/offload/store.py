"""The unit store: each unit (a decoder layer, the embeddings, the head) is one file of named tensors.

File layout (every offset a multiple of ALIGN, so reads and writes can bypass the page cache, O_DIRECT):

    [0, header)    b"SLIMUNIT" + u32 length + JSON {"tensors": [{name, dtype, shape, offset, nbytes,
                   hashes}]}, zero-padded to a multiple of ALIGN
    tensor data    each tensor at its own aligned offset, padded to ALIGN

`hashes` holds one xxh3-64 per CHUNK elements of the tensor (chunks count elements, not bytes, so chunk i of
a weight, of its fp32 moments and of their int8 codes cover the same values and can be streamed together).
xxh3 runs at ~30 GB/s, far above the disk; zlib's crc32 would cost a core at these volumes. Every read verifies
the chunks it reads: a mismatch raises
StoreCorrupt naming the file, and nothing read from it is used.

Files are never rewritten in place: a new version of a unit is written to a temp file and renamed
(`<unit>.<version>.bin`), and the old one unlinked. A snapshot is therefore hard links to the current
files plus a manifest: no copy, and the next writes cannot touch it (copy-on-write by construction).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from slimtune.errors import SlimtuneError

ALIGN = 4096
CHUNK = 2**22  # elements per checksum and per I/O request (16 MiB of fp32); x itemsize is a multiple of ALIGN
MAGIC = b"SLIMUNIT"
TRANSIENT = ("~grad",)  # units that never outlive a step (partial gradient sums): not in snapshots


class StoreCorrupt(SlimtuneError):
    """A store file failed its checksum or cannot be parsed."""


class StoreFull(SlimtuneError):
    """The disk ran out of space while writing a store file."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _hash(view) -> int:
    return xxhash.xxh3_64_intdigest(view)


@dataclass(frozen=True)
class Entry:
    """One tensor of a unit file."""

    name: str
    dtype: str
    shape: tuple
    offset: int
    nbytes: int
    hashes: tuple = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def chunk_bytes(self) -> int:
        return CHUNK * (self.nbytes // max(_numel(self.shape), 1))


def layout(specs: list[tuple[str, torch.dtype, tuple]], meta_bytes: int = 0) -> tuple[list[Entry], int]:
    """Entries (without hashes) for (name, dtype, shape) specs, and the header size they need."""
    meta = [{"name": n, "dtype": str(d).removeprefix("torch."), "shape": list(s)} for n, d, s in specs]
    # header length bound: the JSON with room for the hashes (20 digits per chunk) and offsets
    est = len(json.dumps(meta)) + sum(60 + 24 * (-(-_numel(s) // CHUNK)) for _, d, s in specs) + 64 + meta_bytes
    header = _align(est + len(MAGIC) + 4)
    entries, offset = [], header
    for m, (_, d, s) in zip(meta, specs):
        nbytes = _nbytes(d, s)
        entries.append(Entry(m["name"], m["dtype"], tuple(s), offset, nbytes))
        offset += _align(nbytes)
    return entries, header


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(dtype: torch.dtype, shape) -> int:
    return _numel(shape) * torch.empty((), dtype=dtype).element_size()


def _open(path: Path, write: bool, direct: bool) -> tuple[int, bool]:
    """(fd, direct): O_DIRECT when asked and the file system takes it, else buffered."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # tmpfs and some others refuse O_DIRECT: fall back
                raise
    return os.open(path, flags, 0o666), False


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class UnitStore:
    """A directory of unit files; `io_threads` threads do the reads and writes (os.preadv / pwritev
    release the GIL), so I/O runs beside compute. Reads and writes go CHUNK by CHUNK and return futures.

        w = store.writer("layer.3", [(name, dtype, shape), ...], meta={...})
        w.write(name, tensor)                  # or a piece: w.write(name, part, elem_offset=k * CHUNK)
        w.commit()                             # waits, writes the header, renames: the new current version
        store.read("layer.3", name, out).result()   # verified against the chunk hashes
    """

    def __init__(self, root: Path, io_threads: int = 4, direct: bool = True, lock=None):
        """lock: the open file holding the store's lock (rundir.lock_exclusive), released by close()."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock_file = lock
        self.direct = direct
        self.pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="slimtune-io")
        # commits wait for their writes: on their own thread, never holding an I/O thread
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="slimtune-commit")
        self.files: dict[str, str] = {}  # unit -> current file name
        self.entries: dict[str, dict[str, Entry]] = {}  # unit -> tensor name -> entry (current file)
        self.metas: dict[str, dict] = {}  # unit -> its JSON metadata
        self._version = 0
        self._lock = threading.Lock()
        self.bytes_read = self.bytes_written = 0
        self.io_seconds = 0.0

    def has(self, unit: str) -> bool:
        return unit in self.files

    def specs(self, unit: str) -> dict[str, Entry]:
        return self.entries[unit]

    def meta(self, unit: str) -> dict:
        return self.metas[unit]

    # --------------------------------------------------------------- writing

    def writer(self, unit: str, specs: list[tuple[str, torch.dtype, tuple]], meta: dict | None = None) -> UnitWriter:
        with self._lock:
            self._version += 1
            name = f"{unit}.{self._version:08d}.bin"
        return UnitWriter(self, unit, name, specs, meta or {})

    def write_all(self, unit: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Write a whole unit (blocking)."""
        w = self.writer(unit, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], meta)
        for n, t in tensors.items():
            w.write(n, t)
        w.commit()

    def _publish(self, unit: str, name: str, entries: dict[str, Entry], meta: dict, nbytes: int) -> None:
        with self._lock:
            old = self.files.get(unit)
            self.files[unit], self.entries[unit], self.metas[unit] = name, entries, meta
            self.bytes_written += nbytes
        if old is not None:
            (self.root / old).unlink(missing_ok=True)  # a snapshot's hard link keeps its data

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int, direct: bool) -> None:
        if direct and (len(view) % ALIGN or _addr(view) % ALIGN):  # O_DIRECT: whole, aligned blocks
            padded = _aligned(len(view))
            padded[: len(view)] = view
            view = padded
        while len(view):
            n = os.pwritev(fd, [view], offset)
            view, offset = view[n:], offset + n

    # --------------------------------------------------------------- reading

    def read(self, unit: str, name: str, out: torch.Tensor, elem_offset: int = 0) -> Future:
        """Fill `out` (contiguous CPU tensor of the stored dtype) with elements [elem_offset, elem_offset +
        out.numel()) of the flattened tensor `name` of `unit`; elem_offset a multiple of CHUNK, and the
        range whole chunks (or up to the tensor's end). Verified chunk by chunk."""
        if elem_offset % CHUNK:
            raise ValueError(f"store reads start at a multiple of {CHUNK} elements, got {elem_offset}")
        with self._lock:
            path, entry = self.root / self.files[unit], self.entries[unit][name]
        if out.dtype != entry.torch_dtype:
            raise StoreCorrupt(
                f"{path}: tensor {name!r} is {entry.dtype}, the model expects {out.dtype}; the "
                "store does not match the model"
            )
        return self.pool.submit(self._read, path, entry, out, elem_offset * out.element_size())

    def _read(self, path: Path, e: Entry, out: torch.Tensor, byte_offset: int) -> torch.Tensor:
        t0 = time.perf_counter()
        view, step = _bytes_view(out), e.chunk_bytes
        if byte_offset + len(view) > e.nbytes:
            raise StoreCorrupt(
                f"{path}: tensor {e.name!r} holds {e.nbytes} bytes, asked for "
                f"{byte_offset + len(view)}; the store does not match the model"
            )
        fd, direct = _open(path, False, self.direct)
        try:
            for start in range(0, len(view), step):
                part = view[start : start + step]
                self._pread(fd, part, e.offset + byte_offset + start, direct)
                if _hash(part) != e.hashes[(byte_offset + start) // step]:
                    raise StoreCorrupt(
                        f"{path}: checksum mismatch in tensor {e.name!r} at byte "
                        f"{byte_offset + start}; the store file is corrupted (resume from an "
                        "earlier checkpoint)"
                    )
        finally:
            os.close(fd)
        with self._lock:
            self.bytes_read += len(view)
            self.io_seconds += time.perf_counter() - t0
        return out

    @staticmethod
    def _pread(fd: int, view: memoryview, offset: int, direct: bool) -> None:
        if direct and (len(view) % ALIGN or _addr(view) % ALIGN):  # through an aligned bounce buffer
            bounce = _aligned(len(view))
            UnitStore._pread(fd, bounce, offset, True)
            view[:] = bounce[: len(view)]
            return
        while len(view):
            n = os.preadv(fd, [view], offset)
            if n == 0:
                raise StoreCorrupt(f"store file truncated at byte {offset}")
            view, offset = view[n:], offset + n

    # --------------------------------------------------------------- snapshots: engines/offload/snapshot.py

    def verify(self) -> None:
        """Read every tensor of every current file against its checksums (StoreCorrupt naming the first bad
        file): a resumed run checks the whole snapshot before it writes anything."""
        self._verify_files({self.root / self.files[u]: entries for u, entries in self.entries.items()})

    def _verify_files(self, files: dict[Path, dict[str, Entry]]) -> None:
        jobs = [self.pool.submit(self._verify, path, e) for path, entries in files.items() for e in entries.values()]
        for j in jobs:
            j.result()

    def _verify(self, path: Path, e: Entry) -> None:
        step = e.chunk_bytes
        buf = _aligned(min(step, max(e.nbytes, 1)))
        fd, direct = _open(path, False, self.direct)
        try:
            for start in range(0, e.nbytes, step):
                part = buf[: min(step, e.nbytes - start)]
                self._pread(fd, part, e.offset + start, direct)
                if _hash(part) != e.hashes[start // step]:
                    raise StoreCorrupt(
                        f"{path}: checksum mismatch in tensor {e.name!r} at byte {start}; the store "
                        "file is corrupted (resume from an earlier checkpoint)"
                    )
        finally:
            os.close(fd)

    def close(self, delete: bool = False) -> None:
        """Stop the I/O threads (queued work is dropped), remove the store's directory if `delete` (snapshots
        keep their own links), then release the lock. Safe to call again."""
        self.committer.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if delete:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.lock_file is not None:
            self.lock_file.close()  # releases the flock
            self.lock_file = None


class UnitWriter:
    """A new version of one unit, filled piece by piece (each piece starting at a CHUNK boundary of its
    tensor), then committed: header written last, temp file renamed. ENOSPC -> StoreFull, temp removed."""

    def __init__(self, store: UnitStore, unit: str, name: str, specs, meta: dict):
        self.store, self.unit, self.name, self.meta = store, unit, name, meta
        entries, self.header = layout(specs, len(json.dumps(meta)))
        self.entries = {e.name: e for e in entries}
        self.hashes: dict[str, dict[int, int]] = {e.name: {} for e in entries}
        self.tmp = store.root / f".{name}.tmp"
        self.fd, self.direct = _open(self.tmp, True, store.direct)
        self.futures: list[Future] = []

    def write(self, name: str, data: torch.Tensor, elem_offset: int = 0) -> Future:
        """Queue `data` (contiguous CPU tensor, kept alive by the caller until the future is done) as the
        elements [elem_offset, ...) of tensor `name`; elem_offset a multiple of CHUNK."""
        if elem_offset % CHUNK:
            raise ValueError(f"store writes start at a multiple of {CHUNK} elements, got {elem_offset}")
        f = self.store.pool.submit(self._write, name, data, elem_offset * data.element_size())
        self.futures.append(f)
        return f

    def _write(self, name: str, data: torch.Tensor, byte_offset: int) -> None:
        t0 = time.perf_counter()
        e, view = self.entries[name], _bytes_view(data.contiguous())
        step = e.chunk_bytes
        for start in range(0, len(view), step):
            part = view[start : start + step]
            self.hashes[name][(byte_offset + start) // step] = _hash(part)
            self.store._pwrite(self.fd, part, e.offset + byte_offset + start, self.direct)
        with self.store._lock:
            self.store.io_seconds += time.perf_counter() - t0

    def commit(self) -> None:
        try:
            for f in self.futures:
                f.result()
            done = {}
            for n, e in self.entries.items():
                chunks = max(1, -(-_numel(e.shape) // CHUNK))
                if sorted(self.hashes[n]) != list(range(chunks)):
                    raise RuntimeError(f"store writer for {self.unit}: tensor {n!r} not fully written")
                done[n] = Entry(
                    e.name, e.dtype, e.shape, e.offset, e.nbytes, tuple(self.hashes[n][i] for i in range(chunks))
                )
            self.store._pwrite(self.fd, _header(list(done.values()), self.meta, self.header), 0, self.direct)
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise StoreFull(
                    f"{self.store.root}: no space left on the device while writing {self.unit}; free "
                    "space or set offload.dir to a larger disk (the last checkpoint is intact)"
                ) from None
            raise
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        os.replace(self.tmp, self.store.root / self.name)
        nbytes = self.header + sum(_align(e.nbytes) for e in done.values())
        self.store._publish(self.unit, self.name, done, self.meta, nbytes)

    def abort(self) -> None:
        for f in self.futures:
            f.cancel()
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def _header(entries: list[Entry], meta: dict, size: int) -> memoryview:
    body = json.dumps(
        {
            "meta": meta,
            "tensors": [
                {
                    "name": e.name,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "offset": e.offset,
                    "nbytes": e.nbytes,
                    "hashes": list(e.hashes),
                }
                for e in entries
            ],
        }
    ).encode()
    if len(MAGIC) + 4 + len(body) > size:
        raise RuntimeError("store header overflow: metadata larger than reserved")  # a bug if reached
    buf = _aligned(size)
    raw = MAGIC + struct.pack("<I", len(body)) + body
    buf[: len(raw)] = raw
    return buf


def _aligned(nbytes: int) -> memoryview:
    """A zeroed, page-aligned buffer of `nbytes` (rounded up to ALIGN)."""
    return memoryview(mmap.mmap(-1, _align(max(nbytes, 1))))[: _align(max(nbytes, 1))]


def _addr(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else 0
