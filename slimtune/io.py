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
import time
from pathlib import Path

import torch


def cache_dir() -> Path:
    """slimtune's cache: $SLIMTUNE_CACHE, else $XDG_CACHE_HOME/slimtune (~/.cache/slimtune): built-in models,
    the data cache (data/)."""
    root = (
        os.environ.get("SLIMTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimtune"
    )
    return Path(root)


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

        raise SlimtuneError(
            f"{manifest}: {key} names {name!r}, which is not a file inside {root}; the checkpoint "
            "was tampered with or is corrupted (a manifest may only name files in its own directory)"
        )
    return Path(root) / name


# slimtune's manifests: a file the scan of a model dir skips (each is checked by its own loader)
MANIFESTS = ("slimtune_compressed.json", "slimtune_quant.json", "slimtune_sparse.json", "slimtune_adapter.json")
NOT_READ = ("quantize_report.json", "allocation.txt")  # slimtune's reports beside a quantized checkpoint
READ_SUBDIRS = ("additional_chat_templates",)  # a tokenizer's extra templates: transformers reads them
_sums: dict[tuple, str] = {}  # (dev, inode, size, mtime, ctime) -> checksum, for files older than 2 s


def file_checksum(path: Path) -> str:
    """xxh3-128 (hex) of a file's bytes, through a symlink. Remembered per version of the file (device,
    inode, size, mtime, ctime) once it is 2 s old, so a model dir read in several steps is hashed once; a
    younger file could change again within the clock's resolution, so it is hashed each time."""
    import xxhash

    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _sums:
        return _sums[key]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if time.time() - max(st.st_mtime, st.st_ctime) > 2:
        _sums[key] = h.hexdigest()
    return h.hexdigest()


def loaded_files(root: Path, subdirs=()) -> list[str]:
    """Relative paths (posix) of the files of a model dir that a loader may read: its top-level files but
    slimtune's manifests and reports, hidden files and a model card or license (*.md, LICENSE*), and every
    file under `subdirs` (a compressed export's adapter/) and additional_chat_templates/. Other subdirs are
    not read (an export written inside the dir it was made from, say). Symlinked files are listed (a
    Hugging Face cache snapshot)."""
    root, out = Path(root), []
    for sub in (".", *READ_SUBDIRS, *subdirs):
        if not (root / sub).is_dir():
            continue
        for d, dirs, files in os.walk(root / sub):
            dirs[:] = sorted(n for n in dirs if not n.startswith(".")) if sub != "." else []
            rel = Path(d).relative_to(root)
            for n in sorted(files):
                skip = n in MANIFESTS or n in NOT_READ or n.endswith(".md") or n.startswith("LICENSE")
                if n.startswith(".") or (rel == Path(".") and skip) or not (Path(d) / n).is_file():
                    continue
                out.append((rel / n).as_posix())
    return sorted(set(out))


def dir_checksums(root: Path, subdirs=()) -> dict[str, str]:
    """{relative path: xxh3-128} of loaded_files(root, subdirs): what a manifest records when its dir is
    written."""
    return {n: file_checksum(Path(root) / n) for n in loaded_files(root, subdirs)}


def verify_checksums(root: Path, checksums, manifest: Path, fix: str, required=()) -> None:
    """Check a dir's files against `checksums` (manifest key "checksums" of `manifest`) before any is read:
    every name a relative path inside root (manifest_path), every file present with its bytes, and every
    name in `required` (the files its loader reads) listed. Else one line naming the file and `fix`."""
    from slimtune.errors import SlimtuneError

    root = Path(root)
    if not isinstance(checksums, dict):
        raise SlimtuneError(
            f"{manifest}: no 'checksums' (written by an older slimtune, or tampered with); the "
            f"files it names cannot be verified; {fix}"
        )
    paths = {}
    for name, want in checksums.items():
        paths[name] = manifest_path(root, name, manifest, "checksums")
        if not isinstance(want, str):
            raise SlimtuneError(f"{manifest}: checksums[{name!r}] is not a checksum; {fix}")
    listed = {os.path.normpath(n) for n in checksums}
    for name in required:
        if os.path.normpath(name) not in listed:
            raise SlimtuneError(
                f"{manifest}: 'checksums' has no entry for {name}, a file the loader reads; the "
                f"checkpoint was tampered with or is incomplete; {fix}"
            )
    for name, path in paths.items():
        if not path.is_file():
            raise SlimtuneError(f"{path}: missing, but {manifest.name} lists it; the checkpoint is incomplete; {fix}")
        if file_checksum(path) != checksums[name]:
            raise SlimtuneError(
                f"{path}: its bytes do not match the checksum in {manifest.name}; the file was "
                f"changed or corrupted; {fix}"
            )


def flatten_state(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested state (dicts/lists of tensors and scalars) into a flat tensor dict for safetensors
    and a JSON skeleton where each tensor is replaced by {"__tensor__": key}."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            tensors[path] = o.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(o, dict):
            return {
                "__dict__": [
                    [walk(k, f"{path}.k{i}") if not isinstance(k, (str, int)) else k, walk(v, f"{path}.{k}")]
                    for i, (k, v) in enumerate(o.items())
                ]
            }
        if isinstance(o, (list, tuple)):
            return {
                "__list__" if isinstance(o, list) else "__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(o)]
            }
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
