"""Step checkpoints: `checkpoints/step_N/` = trainable weights, optimizer state and the step (which fixes the
data position and every seed: no RNG state is stored).

Layout (all safetensors + JSON):
  trainable.safetensors   trainable parameters by qualified name
  optimizer.safetensors   optimizer tensors;  optimizer.json  its skeleton (param groups, scalars)
  trainer_state.json      step, tokens seen, seconds so far, compute_dtype (what model.dtype=auto chose)
  masks.safetensors       a pruned base's masks (recovery; checked against the base on resume)
  adapters.safetensors    adapters' state beyond trainable parameters (sparse_ft's indices and statistics)
  config.yaml             the resolved config (model.dtype as asked: auto stays auto)
  checksums.json          xxh3-128 of each file above, by name
  COMPLETE                written last; a directory without it is ignored on resume
The directory is filled under a temp name and renamed; only the newest `keep` are kept. A checkpoint may be
copied from elsewhere: every file is checked against checksums.json before it is read (one line naming the
file), and a checkpoint without checksums.json (written by an older slimtune) is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtune.aliases import rename
from slimtune.config import to_dict
from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir, file_checksum, flatten_state, manifest_path, unflatten_state, write_json, write_text

MARKER = "COMPLETE"
MASKS = "masks.safetensors"  # a pruned base's masks (recovery): uint8 per trained matrix
ADAPTERS = "adapters.safetensors"  # adapters' state beyond trainable parameters (sparse_ft's indices, ...)
STEP_DIR = re.compile(r"^step_(\d+)$")
CHECKSUMS = "checksums.json"  # {"format": "slimtune-checkpoint", "version": 1, "checksums": {file: xxh3-128}}


def saved(p: nn.Parameter) -> bool:
    """Whether a checkpoint holds `p`: trainable, or `discrete` (updated outside the optimizer: PV-Tuning's codes)."""
    return p.requires_grad or getattr(p, "discrete", False)


def trainable_state(model: nn.Module, skip=frozenset()) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (but the names in `skip`: an engine's own, saved its own way)."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if saved(p) and n not in skip}


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer,
    trainer_state: dict,
    config_yaml: str,
    keep: int,
    skip=frozenset(),
    extra: dict | None = None,
) -> Path:
    """Write checkpoints/step_<step> (atomically) and drop all but the newest `keep`. skip: parameter
    names an engine saves itself (the offload store's); extra: file name -> tensors, saved beside."""
    return save_state(
        root, step, trainable_state(model, skip), optimizer.state_dict(), trainer_state, config_yaml, keep, extra
    )


def save_state(
    root: Path,
    step: int,
    weights: dict,
    optimizer_state: dict,
    trainer_state: dict,
    config_yaml: str,
    keep: int,
    extra: dict | None = None,
) -> Path:
    """save_checkpoint's writer, from the tensors themselves (an engine that gathers a sharded model's full
    weights and name-keyed optimizer state hands them here)."""
    target = Path(root) / f"step_{step}"
    with atomic_dir(target) as tmp:
        for fname, tensors in (extra or {}).items():
            save_file(tensors, str(tmp / fname))
        save_file(weights, str(tmp / "trainable.safetensors"))
        tensors, skeleton = flatten_state(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", skeleton)
        write_json(tmp / "trainer_state.json", {**trainer_state, "step": step})
        write_text(tmp / "config.yaml", config_yaml)
        sums = {f.name: file_checksum(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json(tmp / CHECKSUMS, {"format": "slimtune-checkpoint", "version": 1, "checksums": sums})
        write_text(tmp / MARKER, "ok\n")
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step dirs, oldest first; incomplete ones are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        if not (d / MARKER).is_file():
            warnings.warn(f"ignoring incomplete checkpoint {d} (no {MARKER} marker)", stacklevel=2)
            continue
        found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def verified(ckpt: Path, fname: str) -> Path:
    """ckpt / fname, after checking its bytes against the checkpoint's checksums.json (SlimtuneError: one
    line naming the file). A checkpoint written before checksums existed is refused."""
    ckpt = Path(ckpt)
    listing = ckpt / CHECKSUMS
    try:
        sums = json.loads(listing.read_text())["checksums"]
        if not isinstance(sums, dict):
            raise TypeError("not a mapping")
    except FileNotFoundError:
        raise SlimtuneError(
            f"checkpoint {ckpt} has no {CHECKSUMS} (written by an older slimtune, or tampered "
            "with), so its files cannot be verified; resume from a checkpoint written by this "
            "version, or start a new run in another output_dir"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlimtuneError(
            f"checkpoint {ckpt} is corrupted ({listing.name}: {e!r}); delete it to resume from an older one"
        ) from None
    for name in sums:
        manifest_path(ckpt, name, listing, "checksums")
    path = ckpt / fname
    if fname not in sums:
        raise SlimtuneError(
            f"checkpoint {ckpt} is corrupted: {fname} has no checksum in {CHECKSUMS}; delete it to "
            "resume from an older one"
        )
    if not path.is_file() or file_checksum(path) != sums[fname]:
        raise SlimtuneError(
            f"checkpoint {ckpt} is corrupted: {fname} is missing or does not match its checksum in "
            f"{CHECKSUMS}; delete it to resume from an older one"
        )
    return path


def read_state(ckpt: Path) -> tuple[dict, dict, dict]:
    """(trainable weights, optimizer state, trainer_state) of `ckpt`, each file verified (verified).
    Corruption is a SlimtuneError."""
    ckpt = Path(ckpt)
    files = [
        verified(ckpt, f)
        for f in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json")
    ]
    try:
        weights = load_file(str(files[0]))
        opt_tensors = load_file(str(files[1]))
        skeleton = json.loads(files[2].read_text())
        state = json.loads(files[3].read_text())
    except (FileNotFoundError, SafetensorError, json.JSONDecodeError, OSError) as e:
        raise SlimtuneError(f"checkpoint {ckpt} is corrupted ({e}); delete it to resume from an older one") from None
    return weights, unflatten_state(skeleton, opt_tensors), state


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer, skip=frozenset()) -> dict:
    """Restore weights and optimizer from `ckpt`; returns trainer_state. Corruption is a SlimtuneError."""
    ckpt = Path(ckpt)
    weights, optimizer_state, state = read_state(ckpt)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if saved(p) and n not in skip}
    if set(weights) != expected:
        diff = sorted(set(weights) ^ expected)
        raise SlimtuneError(
            f"checkpoint {ckpt} does not match the model (e.g. '{diff[0]}'); resume with the config it was written with"
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise SlimtuneError(
            f"checkpoint {ckpt}: optimizer state does not match ({e}); same optim.name needed"
        ) from None
    return state


# core keys (or sections, ending in ".") a resumed run must keep: they fix the data order or what the saved
# weights and optimizer state mean; a technique's section says the same of its keys (schema.option's `fixed`)
FROZEN_ON_RESUME = (
    "model.",
    "data.source",
    "data.eval_fraction",
    "adapter.",
    "quant.",
    "train.seq_len",
    "train.seed",
    "train.precision",
    "optim.name",
    "optim.state_bits",
    "optim.master_dtype",
    "optim.compensation",
    "optim.full_rank_modules",
    "optim.in_backward",
)


def frozen_on_resume() -> tuple[str, ...]:
    """FROZEN_ON_RESUME and every technique section's fixed keys (a whole section: "name.")."""
    from dataclasses import fields

    from slimtune.registry import SECTIONS

    keys = list(FROZEN_ON_RESUME)
    for name, section in SECTIONS.items():
        if getattr(section, "fixed_on_resume", False):
            keys.append(f"{name}.")
        keys += [f"{name}.{f.name}" for f in fields(section) if f.metadata.get("fixed")]
    return tuple(keys)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resume(ckpt: Path, cfg, world: int) -> None:
    """SlimtuneError naming the first key whose change would make resuming from `ckpt` wrong."""
    import yaml

    config, state_file = verified(ckpt, "config.yaml"), verified(ckpt, "trainer_state.json")
    try:
        raw = yaml.safe_load(config.read_text())
        rename(raw)  # a checkpoint written before the keys moved (aliases.py)
        old = _flat(raw)
        state = json.loads(state_file.read_text())
    except (OSError, yaml.YAMLError, json.JSONDecodeError, AttributeError) as e:
        raise SlimtuneError(f"checkpoint {ckpt} is corrupted ({e}); delete it to resume from an older one") from None
    new = _flat(to_dict(cfg))
    if "model.dtype" in old:  # model.dtype=auto on either side: compare the dtype the checkpoint's run used
        old["model.dtype"] = state.get("compute_dtype", old["model.dtype"])
        if new["model.dtype"] == "auto" or old["model.dtype"] == "auto":
            del old["model.dtype"]  # auto resumes in the checkpoint's dtype (hardware.resolve_dtype)
    frozen = frozen_on_resume()
    for key in new:
        if key.startswith(frozen) or key in frozen:
            if key in old and old[key] != new[key]:
                raise SlimtuneError(
                    f"resume: {key}={new[key]!r} differs from {old[key]!r} in {ckpt}/config.yaml, and "
                    "changing it changes the data order or the meaning of the saved state; resume "
                    f"with {key}={old[key]!r}, or start a new run in another output_dir"
                )
    t_new = cfg.train
    old_global = old.get("train.batch_size", 0) * old.get("train.grad_accum", 0) * state.get("world_size", 1)
    new_global = t_new.batch_size * t_new.grad_accum * world
    if old_global != new_global:
        raise SlimtuneError(
            f"resume: the global batch train.batch_size x train.grad_accum x world size = "
            f"{t_new.batch_size} x {t_new.grad_accum} x {world} = {new_global} differs from the "
            f"checkpoint's {old_global} ({ckpt}); keep the product equal (e.g. double grad_accum "
            "when halving the processes)"
        )


def checkpoint_dtype(ckpt: Path | None) -> str | None:
    """The compute dtype `ckpt`'s run used (trainer_state.json, else its config's model.dtype); None without."""
    import yaml

    if ckpt is None:
        return None
    try:
        state = json.loads(verified(ckpt, "trainer_state.json").read_text())
        if "compute_dtype" in state:
            return state["compute_dtype"]
        return (yaml.safe_load(verified(ckpt, "config.yaml").read_text()).get("model") or {}).get("dtype")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def check_masks(ckpt: Path, masks: dict[str, torch.Tensor]) -> None:
    """The checkpoint's masks equal the ones read from the sparse base now (else the base changed)."""
    path = verified(ckpt, MASKS)
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise SlimtuneError(
            f"{path}: cannot read the checkpoint's sparsity masks ({e}); resume from an earlier checkpoint"
        ) from None
    if saved.keys() != masks.keys() or any(not torch.equal(saved[k], masks[k]) for k in masks):
        raise SlimtuneError(
            f"{path}: the masks differ from the pruned base's zeros now; model.name must be the "
            "sparse model the run started from"
        )


def load_extra(ckpt: Path, fname: str) -> dict[str, torch.Tensor]:
    """A file save_checkpoint(extra=...) wrote (a corrupted or missing one is a SlimtuneError)."""
    path = verified(ckpt, fname)
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise SlimtuneError(f"{path}: cannot read it ({e}); resume from an earlier checkpoint") from None
