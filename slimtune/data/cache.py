"""Tokenize once: a source's documents as a memory-mapped token file, reused by every later run, resume,
`eval` and calibration.

An entry is a directory `<data.cache_dir>/<key>/` (default `<slimtune cache>/data`), key = sha256 of the
source's content hash, the tokenizer (its serialized vocabulary and rules), the chat template and
data.train_on:
    tokens.bin     every document's tokens back to back (uint16 when the vocabulary fits, else uint32)
    mask.bin       one bit per token (numpy packbits order): 1 = the token is a target
    offsets.bin    int64 (documents + 1,): where each document starts, then the token count
    meta.json      counts, dtype, the key's parts and the files' checksums (written last)
It is built in a temp dir beside it and renamed (atomic), under a lock, so ranks of a torchrun launch and
concurrent runs build it once. A source file's content hash is remembered under `sources/` by (path, size,
mtime, inode), so an unchanged large file is not re-read at every launch. A nanoGPT-style `.bin` of uint16
tokens is mapped as it is (one document, every token a target).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from slimtune.data.sources import IGNORE, documents, iter_records, jsonl_chunks, parse_jsonl
from slimtune.errors import SlimtuneError

VERSION = 1
BATCH_RECORDS = 1024  # records tokenized per call of the (Rust, multi-threaded) fast tokenizer


def default_cache_dir() -> Path:
    from slimtune.io import cache_dir

    return cache_dir() / "data"


class TokenFile:
    """An opened cache entry (or a raw .bin): tokens and target bits read with pread, block by block, so a
    run's resident memory is its batches and the document offsets (8 bytes a document), never the file's pages;
    `tokens` / `mask` map the whole files for a caller that wants arrays."""

    def __init__(self, path: Path, tokens: Path, dtype, mask: Path | None, offsets: np.ndarray):
        self.path, self.dtype, self.offsets = Path(path), np.dtype(dtype), offsets
        self._tokens, self._mask = tokens, mask
        self.n = os.stat(tokens).st_size // self.dtype.itemsize
        self._fd = os.open(tokens, os.O_RDONLY)
        self._mask_fd = os.open(mask, os.O_RDONLY) if mask is not None else None

    def __del__(self):
        for fd in (getattr(self, "_fd", None), getattr(self, "_mask_fd", None)):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __len__(self) -> int:
        return self.n

    @property
    def documents(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def tokens(self) -> np.ndarray:
        return np.memmap(self._tokens, dtype=self.dtype, mode="r", shape=(self.n,))

    @property
    def mask(self) -> np.ndarray | None:
        return None if self._mask is None else np.memmap(self._mask, dtype=np.uint8, mode="r")

    def _read(self, fd: int, offset: int, nbytes: int) -> bytes:
        data = os.pread(fd, nbytes, offset)
        while len(data) < nbytes:  # pread may return less than asked
            more = os.pread(fd, nbytes - len(data), offset + len(data))
            if not more:
                raise SlimtuneError(f"{self.path}: the data cache ends early; delete it and it is rebuilt")
            data += more
        return data

    def ids(self, start: int, end: int) -> np.ndarray:
        size = self.dtype.itemsize
        raw = self._read(self._fd, start * size, (end - start) * size)
        return np.frombuffer(raw, dtype=self.dtype).astype(np.int64)

    def targets(self, start: int, end: int) -> np.ndarray:
        """bool (end - start,): which of these tokens carry loss."""
        if self._mask_fd is None:
            return np.ones(end - start, dtype=bool)
        first, last = start // 8, -(-end // 8)
        bits = np.unpackbits(np.frombuffer(self._read(self._mask_fd, first, last - first), dtype=np.uint8))
        return bits[start - 8 * first : end - 8 * first].astype(bool)

    def labels(self, start: int, end: int) -> np.ndarray:
        return np.where(self.targets(start, end), self.ids(start, end), IGNORE)


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def content_hash(source: str, root: Path) -> str:
    """The source's content hash: pydoc's text, or the file's bytes (xxh3-128), remembered per (path, size,
    mtime, inode) under root/sources so an unchanged file is hashed once."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return _sha("\0".join(f"{k}\0{topics[k]}" for k in sorted(topics)))
    path = Path(source).expanduser().resolve()
    if path.is_dir():  # a datasets.save_to_disk dir: its files
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return _sha("".join(f"{p.relative_to(path)}\0{content_hash(str(p), root)}\0" for p in files))
    if not path.is_file():
        raise SlimtuneError(
            f"data.source={source!r}: file not found; give pydoc, a .txt, .jsonl, .parquet or .bin "
            "path or a datasets.save_to_disk directory"
        )
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo = root / "sources" / f"{_sha(str(path))[:32]}.json"
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp:
            return known["hash"]
    except (OSError, ValueError, AttributeError):
        pass
    from slimtune.io import file_checksum, write_json

    digest = file_checksum(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_json(memo, {**stamp, "hash": digest})
    return digest


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(f"{spec}\0{tokenizer.eos_token_id}\0{tokenizer.pad_token_id}")


def cache_key(source: str, tokenizer, train_on: str, root: Path) -> tuple[str, dict]:
    parts = {
        "version": VERSION,
        "source": str(source),
        "content": content_hash(source, root),
        "tokenizer": tokenizer_hash(tokenizer),
        "chat_template": _sha(str(getattr(tokenizer, "chat_template", None) or "")),
        "train_on": train_on,
    }
    return _sha(json.dumps({k: v for k, v in parts.items() if k != "source"}, sort_keys=True))[:32], parts


def token_file(
    source: str,
    tokenizer,
    train_on: str = "assistant",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    num_proc: int = 0,
) -> TokenFile:
    """The cache entry of `source` (built on first use, under a lock), opened."""
    if str(source).endswith(".bin"):
        return _raw_bin(Path(source).expanduser(), tokenizer)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key, parts = cache_key(source, tokenizer, train_on, root)
    entry = root / key
    if not (entry / "meta.json").is_file():
        with open(root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank or run building it: wait, then find it built
            if not (entry / "meta.json").is_file():
                _build(source, tokenizer, train_on, entry, parts, progress, num_processes(source, num_proc))
    return open_entry(entry)


def _raw_bin(path: Path, tokenizer) -> TokenFile:
    if not path.is_file():
        raise SlimtuneError(f"data.source={path}: file not found")
    if path.stat().st_size % 2:
        raise SlimtuneError(f"data.source={path}: a .bin source is uint16 tokens (nanoGPT's format); its size is odd")
    top = 0
    with open(path, "rb") as f:  # read, not mapped: the check leaves no pages resident
        while chunk := f.read(1 << 24):
            top = max(top, int(np.frombuffer(chunk, dtype=np.uint16).max(initial=0)))
    if top >= len(tokenizer):
        raise SlimtuneError(
            f"data.source={path}: token id {top} is beyond the tokenizer's {len(tokenizer)} tokens; was it "
            "written with another tokenizer?"
        )
    n = path.stat().st_size // 2
    return TokenFile(path, path, np.uint16, None, np.array([0, n], dtype=np.int64))


def _token_dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= 2**16 else np.uint32


def _text_batches(records, tokenizer, train_on: str, source: str):
    """(ids, labels) per record, text records tokenized BATCH_RECORDS at a time (one batch call of the fast
    tokenizer); the same tokens as sources.documents."""
    pending = []

    def flush():
        texts = [r["text"] for r in pending]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        eos = tokenizer.eos_token_id
        for t in ids:
            t = list(t) + [eos]
            yield t, t
        pending.clear()

    for rec in records:
        if "text" in rec and "messages" not in rec and "input_ids" not in rec:
            pending.append(rec)
            if len(pending) >= BATCH_RECORDS:
                yield from flush()
            continue
        yield from flush()
        yield from documents([rec], tokenizer, train_on, source)
    yield from flush()


_WORKER: dict = {}  # what a forked tokenizing process inherits: the tokenizer, train_on, source


def _encode(chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk of records (or of raw .jsonl lines: (first line number, lines)) -> (tokens int64, targets bool,
    document lengths int64), in the process that runs it."""
    tokenizer, train_on, source = _WORKER["tokenizer"], _WORKER["train_on"], _WORKER["source"]
    if isinstance(chunk, tuple):
        chunk = parse_jsonl(Path(source).expanduser(), *chunk)
    ids, targets, lengths = [], [], []
    for a, y in _text_batches(chunk, tokenizer, train_on, source):
        a, y = np.asarray(a, dtype=np.int64), np.asarray(y, dtype=np.int64)
        if not np.all((y == a) | (y == IGNORE)):
            raise SlimtuneError(f"data.source={source}: labels must be the token or -100")
        ids.append(a)
        targets.append(y != IGNORE)
        lengths.append(len(a))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64)
    return np.concatenate(ids), np.concatenate(targets), np.asarray(lengths, dtype=np.int64)


def _chunks(source: str):
    """The source in chunks of BATCH_RECORDS records; a .jsonl as raw lines (parsed where they are tokenized)."""
    path = Path(str(source)).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        yield from jsonl_chunks(path, BATCH_RECORDS)
        return
    chunk = []
    for rec in iter_records(source):
        chunk.append(rec)
        if len(chunk) == BATCH_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def num_processes(source: str, requested: int) -> int:
    """data.num_proc, or 0 = auto: every core for a source over 32 MB, one process below (forking costs more
    than it saves on a small one)."""
    if requested > 0:
        return requested
    try:
        big = Path(str(source)).expanduser().stat().st_size > 32 * 2**20
    except OSError:
        big = False
    return (os.cpu_count() or 1) if big else 1


def _encoded(source: str, tokenizer, train_on: str, procs: int):
    """(tokens, targets, lengths) per chunk, in order: here, or in `procs` forked processes."""
    _WORKER.update(tokenizer=tokenizer, train_on=train_on, source=source)
    if procs <= 1:
        yield from map(_encode, _chunks(source))
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(procs) as pool:
        yield from pool.imap(_encode, _chunks(source), chunksize=1)


def _build(source: str, tokenizer, train_on: str, entry: Path, parts: dict, progress: bool, num_proc: int) -> None:
    from tqdm import tqdm

    from slimtune.io import dir_checksums, write_json

    dtype = _token_dtype(tokenizer)
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0, n, docs = time.perf_counter(), 0, 0
    bar = tqdm(
        unit="tok",
        unit_scale=True,
        desc=f"tokenizing {Path(str(source)).name}",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    with (
        open(tmp / "tokens.bin", "wb") as ft,
        open(tmp / "targets.tmp", "wb") as fm,
        open(tmp / "offsets.bin", "wb") as fo,
    ):
        fo.write(np.int64(0).tobytes())
        for a, targets, lengths in _encoded(source, tokenizer, train_on, num_proc):
            if len(a) and (a.max() > np.iinfo(dtype).max or a.min() < 0):
                raise SlimtuneError(f"data.source={source}: token id {int(a.max())} does not fit the tokenizer")
            ft.write(a.astype(dtype).tobytes())
            fm.write(targets.astype(np.uint8).tobytes())
            fo.write((n + np.cumsum(lengths)).astype(np.int64).tobytes())  # where each next document starts
            n, docs = n + len(a), docs + len(lengths)
            bar.update(len(a))
    bar.close()
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SlimtuneError(f"data.source={source!r}: no tokens")
    with open(tmp / "targets.tmp", "rb") as src, open(tmp / "mask.bin", "wb") as f:
        while chunk := src.read(1 << 24):  # a multiple of 8: the packed chunks join (read, not mapped: flat RSS)
            f.write(np.packbits(np.frombuffer(chunk, dtype=np.uint8)).tobytes())
    (tmp / "targets.tmp").unlink()
    meta = {
        **parts,
        "tokens": n,
        "documents": docs,
        "dtype": np.dtype(dtype).name,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(tmp / "meta.json", {**meta, "checksums": dir_checksums(tmp)})
    os.replace(tmp, entry)


def open_entry(entry: Path) -> TokenFile:
    """Open a cache entry; one line naming it when its files do not match its meta.json (rebuilt on next use
    once removed)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        n, dtype, docs = int(meta["tokens"]), np.dtype(meta["dtype"]), int(meta["documents"])
        sizes = {"tokens.bin": n * dtype.itemsize, "mask.bin": -(-n // 8), "offsets.bin": 8 * (docs + 1)}
        for name, want in sizes.items():
            if (entry / name).stat().st_size != want:
                raise ValueError(f"{name} is {(entry / name).stat().st_size} bytes, expected {want}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlimtuneError(f"{entry}: a broken data cache entry ({e}); delete the directory and it is rebuilt")
    return TokenFile(
        entry, entry / "tokens.bin", dtype, entry / "mask.bin", np.fromfile(entry / "offsets.bin", np.int64)
    )


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
