"""Where a run's offload store lives, and who may use it.

Each run owns one directory: `<output_dir>/offload` by default, or with offload.dir set (a shared fast disk)
its subdirectory `<name>-<hash>`: the output dir's name and a hash of its absolute path, so runs sharing
offload.dir never meet (two runs named `a` in different places differ). Inside: `live/` (`live.rank<r>/` for
the other ranks under torchrun), the store being trained, deleted when the run ends; `snapshots/step_N`, the
checkpoints' hard-link snapshots; and one lock file per rank, held (flock) for the run's lifetime, so a second
process on the same run is refused. Paths are absolute: offload.dir and output_dir are resolved against the
current directory when the run starts, and a checkpoint names its snapshot by absolute path, so a resume
from another directory finds it; a snapshot named outside this run's own directory is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.formats.hf import DTYPES
from slimtune.optim.master import compensation_of
from slimtune.rules import placement
from slimtune.engines.offload.store import UnitStore

STEP_DIR = re.compile(r"^step_\d+$")


def offload_dir(cfg) -> Path:
    """The run's own store directory (absolute)."""
    out = Path(cfg.output_dir).resolve()
    if not cfg.offload.dir:
        return out / "offload"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", out.name).lstrip(".")[:48] or "run"
    return Path(cfg.offload.dir).resolve() / f"{name}-{hashlib.sha256(str(out).encode()).hexdigest()[:12]}"


def live_dir(cfg, rank: int) -> Path:
    """Each rank streams from its own store (snapshots are rank 0's, restored by every rank)."""
    return offload_dir(cfg) / ("live" if rank == 0 else f"live.rank{rank}")


def lock_exclusive(path: Path):
    """An exclusive flock on `path` (created if missing), held until the returned file is closed (or garbage
    collected); BlockingIOError while another process (or another open of the file) holds it."""
    f = path.open("a+b")  # the open file is the lock
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        f.close()
        raise
    return f


def open_store(cfg, numel: int, trainable: int, rank: int = 0, world: int = 1) -> UnitStore:
    """The run's store for `rank`: locked against a second process, a killed run's live files cleared, checked
    writable and large enough, before anything is written. UnitStore.close releases the lock."""
    root, live = offload_dir(cfg), live_dir(cfg, rank)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = lock_exclusive(root / f".{live.name}.lock")
    except BlockingIOError:
        raise SlimtuneError(
            f"offload.dir={cfg.offload.dir!r}, output_dir={cfg.output_dir!r}: another process is "
            f"running this run (its store {root} is locked); wait for it to end, or give this run "
            "another output_dir"
        ) from None
    except OSError as e:
        raise _unwritable(root, e) from None
    try:
        try:
            shutil.rmtree(live, ignore_errors=True)  # a killed run's (its snapshots keep their own links)
            live.mkdir(parents=True)
            probe = live / ".writable"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise _unwritable(root, e) from None
        total = store_bytes(cfg, numel, trainable) * world  # every rank's store on this disk
        # what the run already holds (a resumed run's snapshots) is part of that bound: only the rest is new
        held = bytes_held(root)
        need, free = max(total - held, 0), shutil.disk_usage(root).free
        if need > free:
            raise SlimtuneError(
                f"offload.dir={str(root)!r}: the store needs about {need / 1e9:.1f} GB more (weights, "
                f"optimizer state and checkpoint.keep={cfg.checkpoint.keep} snapshots: {total / 1e9:.1f} GB, "
                f"of which the run already holds {held / 1e9:.1f}) but {free / 1e9:.1f} GB are free; free "
                "space, lower checkpoint.keep, or point offload.dir at a larger disk"
            )
        return UnitStore(live, cfg.offload.io_threads, cfg.offload.direct_io, lock=lock)
    except BaseException:
        lock.close()
        raise


def _unwritable(root: Path, e: OSError) -> SlimtuneError:
    return SlimtuneError(
        f"offload.dir={str(root)!r}: not writable ({e.strerror}); give a writable directory on a fast local disk"
    )


def bytes_held(root: Path) -> int:
    """Disk space the files under `root` take, each hard-linked file once (a snapshot shares its files with
    the live store and with the other snapshots)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if path.is_file() and not path.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def store_terms(cfg, numel: int, trainable: int) -> tuple[int, int]:
    """(live, snapshot): the live store's bytes (streamed frozen weights; the trained ones' master weights,
    Adam's moments, Kahan's buffer, and the gradients clipping or accumulation keep there), and what one
    checkpoint's snapshot can pin besides (every trained tensor in another version; frozen files are shared)."""
    (params, optimizer), t, o = placement(cfg), cfg.train, cfg.optim
    state, master = 0, DTYPES[o.master_dtype].itemsize  # gradients have their master weight's dtype
    if optimizer == "disk":
        kahan = 2 if compensation_of(o) == "kahan" else 0
        state = master + (2.1 if o.state_bits == 8 else 8) + kahan
    grads = state and (t.max_grad_norm > 0 or t.grad_accum > 1)  # the transient ~grad units: never in snapshots
    grad_bytes = trainable * master if grads else 0
    frozen = (numel - trainable) * (4 if cfg.model.dtype == "float32" else 2) if params == "disk" else 0
    return int(frozen + trainable * state + grad_bytes), int(trainable * state)


def checkpoints_kept(cfg) -> int:
    """How many checkpoints the run can hold at once: checkpoint.keep, fewer when train.max_steps ends it first."""
    every, steps = cfg.checkpoint.every, cfg.train.max_steps
    if not every:
        return 0
    if steps <= 0 or cfg.train.epochs > 0:  # train.epochs sets the steps when the data is known
        return cfg.checkpoint.keep
    return min(cfg.checkpoint.keep, steps // every)


def store_bytes(cfg, numel: int, trainable: int) -> int:
    """An upper bound of the store's disk use: every version a snapshot can pin counted in full."""
    live, snapshot = store_terms(cfg, numel, trainable)
    return live + snapshot * checkpoints_kept(cfg)


def _resolved(value) -> Path | None:
    try:
        return Path(value).resolve() if isinstance(value, str) and value else None
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        return None


def checked_snapshot(ckpt: Path, value, run: Path) -> Path:
    """The snapshot a checkpoint's trainer_state.json names under "offload" (`value`, an absolute path), which
    must be one of this run's own (<run>/snapshots/step_N; a run dir is untrusted input). A run dir moved (or
    downloaded) with its default store inside, whose recorded path no longer exists, finds the snapshot by
    name in its own store."""
    snaps = (run / "snapshots").resolve()
    path = _resolved(value)
    moved = path is not None and not path.exists() and (snaps / path.name).is_dir()  # its old place is gone
    if path is None or not STEP_DIR.match(path.name) or (path.parent != snaps and not moved):
        where = (
            f" (it lies in {path.parent.parent}: resume with offload.dir set so that this run's store is there)"
            if path is not None and path.parent.name == "snapshots"
            else ""
        )
        raise SlimtuneError(
            f'{ckpt}/trainer_state.json: "offload" names {value!r}, not a snapshot in this run\'s store {snaps}'
            f"{where}; resume with the output_dir and offload.dir the run was started with (a relative "
            "offload.dir resolves against the current directory), or the checkpoint was tampered with"
        )
    path = snaps / path.name
    if not path.is_dir():
        raise SlimtuneError(
            f"checkpoint {ckpt}: its offload snapshot {str(path)!r} is missing; resume from an "
            "earlier checkpoint (or restore the offload dir)"
        )
    return path


def prune_snapshots(run: Path, checkpoints: list[Path]) -> None:
    """Delete the snapshots of this run that no checkpoint in `checkpoints` names: only ever inside
    <run>/snapshots, never another run's files."""
    snaps = run / "snapshots"
    kept = set()  # by name: a moved run dir's checkpoints name its snapshots by their old absolute paths
    for d in checkpoints:
        try:
            kept.add(Path(json.loads((d / "trainer_state.json").read_text()).get("offload")).name)
        except (OSError, ValueError, TypeError, AttributeError):  # unreadable: it keeps nothing
            continue
    for d in snaps.iterdir():
        if STEP_DIR.match(d.name) and d.is_dir() and not d.is_symlink() and d.name not in kept:
            shutil.rmtree(d, ignore_errors=True)
