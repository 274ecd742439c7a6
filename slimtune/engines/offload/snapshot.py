"""Store snapshots: hard links to a store's current files plus `manifest.json` (unit -> file name, `extra`).

A snapshot comes back from a run directory, which is untrusted input (run dirs get downloaded): `restore`
checks every unit name and file name of the manifest, parses every header and verifies every checksum
before it links anything into the store, and the store's current files go only once the snapshot is in.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from slimtune.io import manifest_path
from slimtune.engines.offload import store as S

# what the engine names units: embed, layer.3, head~frozen (dot-separated tokens, one ~suffix): no '/', no '..'
UNIT_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*(~[A-Za-z0-9_]+)?$")


def snapshot(store: S.UnitStore, target: Path, extra: dict) -> None:
    """Hard-link every current unit file (but the TRANSIENT ones) into `target` and write its manifest
    (call with no write in flight). The manifest is written last: a directory without it is not a snapshot."""
    target.mkdir(parents=True, exist_ok=True)
    files = {u: f for u, f in store.files.items() if not u.endswith(S.TRANSIENT)}
    for name in files.values():
        dst = target / name
        if not dst.exists():
            os.link(store.root / name, dst)
    tmp = target / ".manifest.json.tmp"
    tmp.write_text(json.dumps({"files": files, "extra": extra}))
    os.replace(tmp, target / "manifest.json")


def restore(store: S.UnitStore, source: Path) -> dict:
    """Make the snapshot in `source` the store's current files (hard links back); returns its `extra`.
    Nothing is linked or unlinked before every name, header and checksum of the snapshot has passed."""
    mpath = source / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise S.StoreCorrupt(f"{mpath}: unreadable ({e}); resume from an earlier checkpoint") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise S.StoreCorrupt(
            f"{mpath}: no 'files' table; the snapshot is corrupted (resume from an earlier checkpoint)"
        )
    paths = {}
    for unit, name in files.items():
        if not UNIT_NAME.match(unit) or unit.endswith(S.TRANSIENT):
            raise S.StoreCorrupt(
                f"{mpath}: files names the unit {unit!r}, not a unit name; the checkpoint was "
                "tampered with or is corrupted (resume from an earlier checkpoint)"
            )
        paths[unit] = manifest_path(source, name, mpath, f"files[{unit!r}]")
    parsed = {}
    for unit, path in paths.items():
        if not path.is_file():
            raise S.StoreCorrupt(f"{path}: missing; the snapshot is incomplete (resume from an earlier checkpoint)")
        parsed[unit] = parse_header(path)
    store._verify_files({path: parsed[unit][0] for unit, path in paths.items()})
    linked: dict[str, str] = {}
    try:
        for unit, path in paths.items():
            store._version += 1
            linked[unit] = f"{unit}.{store._version:08d}.bin"
            os.link(path.resolve(), store.root / linked[unit])  # link() itself would link a symlink
    except OSError as e:
        for name in linked.values():
            (store.root / name).unlink(missing_ok=True)
        raise S.StoreCorrupt(
            f"{source}: cannot link its files into {store.root} ({e.strerror}); the snapshots and "
            "the store must be on one file system (offload.dir)"
        ) from None
    old, store.files = store.files, linked
    store.entries = {u: parsed[u][0] for u in linked}
    store.metas = {u: parsed[u][1] for u in linked}
    for name in old.values():
        (store.root / name).unlink(missing_ok=True)
    return manifest.get("extra", {})


def parse_header(path: Path) -> tuple[dict[str, S.Entry], dict]:
    """A unit file's entries and metadata, every field checked (StoreCorrupt naming the file)."""
    with open(path, "rb") as f:
        head = f.read(len(S.MAGIC) + 4)
        if len(head) < len(S.MAGIC) + 4 or head[: len(S.MAGIC)] != S.MAGIC:
            raise S.StoreCorrupt(f"{path}: not a slimtune store file (bad header)")
        (length,) = struct.unpack("<I", head[len(S.MAGIC) :])
        try:
            meta = json.loads(f.read(length))
            entries = {t["name"]: _entry(t) for t in meta["tensors"]}
            extra = meta.get("meta", {})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise S.StoreCorrupt(f"{path}: corrupted header; resume from an earlier checkpoint") from None
    return entries, extra


def _entry(t: dict) -> S.Entry:
    """One tensor of a header: a known dtype, a shape, an aligned offset, nbytes and one hash per chunk."""
    shape = tuple(t["shape"])
    if not isinstance(getattr(torch, t["dtype"], None), torch.dtype) or not all(
        isinstance(n, int) and n >= 0 for n in shape
    ):
        raise ValueError("bad dtype or shape")
    e = S.Entry(t["name"], t["dtype"], shape, t["offset"], t["nbytes"], tuple(t["hashes"]))
    chunks = max(1, -(-S._numel(shape) // S.CHUNK))
    if not (
        isinstance(e.name, str)
        and isinstance(e.offset, int)
        and e.offset >= 0
        and e.offset % S.ALIGN == 0
        and e.nbytes == S._nbytes(e.torch_dtype, shape)
        and len(e.hashes) == chunks
        and all(isinstance(h, int) for h in e.hashes)
    ):
        raise ValueError("bad entry")
    return e
