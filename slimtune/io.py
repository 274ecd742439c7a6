"""Atomic file and directory writes, and nested state dicts <-> (safetensors, JSON).

Everything on disk is safetensors + JSON (never pickle). A file is written to a temp name and renamed;
a directory is filled under a temp name and renamed, so a crash leaves the old copy or the new one,
never half of either. tempfile creates 0600 files and 0700 dirs; they get the process umask's modes
(0644 / 0755 by default) before the rename, so other users on a shared machine can read a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


def _publish(tmp, mode: int) -> None:
    """Give a temp file/dir (0600/0700 from tempfile) the modes open()/mkdir() would have given it."""
    os.chmod(tmp, mode & ~_umask())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _publish(tmp, 0o666)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty dir in `parent` (same file system: renaming it into place is atomic), umask modes."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _publish(tmp, 0o777)
    return tmp


@contextlib.contextmanager
def atomic_dir(target: Path):
    """`with atomic_dir(d) as tmp:` fill tmp; on success tmp replaces d (an older d is removed last)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, f".tmp-{target.name}-")
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers (safetensors) create 0600 files too
            _publish(path, 0o777 if path.is_dir() else 0o666)
        old = None
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def manifest_path(root: Path, name, manifest: Path | str, key: str) -> Path:
    """`root / name` for a file `name` that a manifest lists (`manifest`: the file, `key`: where in it): a
    downloaded checkpoint is untrusted input, so `name` must be a relative path inside `root` (no absolute
    path, no `..` component, no empty or NUL name), else one line naming the manifest, the key and the name.
    The check is on the name, not on where a symlink points: a Hugging Face cache snapshot links its files
    into ../../blobs and stays loadable."""
    bad = not isinstance(name, str) or not name or "\x00" in name or "\\" in name
    parts = Path(name).parts if not bad else ()
    if bad or Path(name).is_absolute() or ".." in parts or not parts or parts[0] == "/":
        from slimtune.errors import SlimtuneError

        raise SlimtuneError(f"{manifest}: {key} names {name!r}, which is not a file inside {root}; the checkpoint "
                            "was tampered with or is corrupted (a manifest may only name files in its own directory)")
    return Path(root) / name


def flatten_state(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested state (dicts/lists of tensors and scalars) into a flat tensor dict for safetensors
    and a JSON skeleton where each tensor is replaced by {"__tensor__": key}."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            tensors[path] = o.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(o, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}") if not isinstance(k, (str, int)) else k,
                                  walk(v, f"{path}.{k}")] for i, (k, v) in enumerate(o.items())]}
        if isinstance(o, (list, tuple)):
            return {"__list__" if isinstance(o, list) else "__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot checkpoint a {type(o).__name__} at {path}")

    return tensors, walk(obj, prefix or "s")


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    def walk(o):
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__dict__" in o:
                return {walk(k) if isinstance(k, dict) else k: walk(v) for k, v in o["__dict__"]}
            if "__list__" in o:
                return [walk(v) for v in o["__list__"]]
            if "__tuple__" in o:
                return tuple(walk(v) for v in o["__tuple__"])
        return o

    return walk(skeleton)
