"""Save/load LoRA adapters in PEFT's on-disk format.

`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
(`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained(base, dir)` loads
what slimtune trained, and slimtune loads PEFT's LoRA adapters: per-module ranks and alphas
(`rank_pattern`, `alpha_pattern`), rsLoRA scaling, DoRA (`use_dora`, `<module>.lora_magnitude_vector`), regex
`target_modules` and `modules_to_save` (full copies of e.g. lm_head). A PiSSA adapter of a plain base is saved
converted to plain LoRA on the original base (adapters/pissa.py). What would load silently wrong (LoRA
biases, fan_in_fan_out, ...) or tensors that
belong to no wrapped module are refused with one line. `slimtune_adapter.json` beside them records the
slimtune model name and the base's quantization (PEFT ignores it), so `slimtune eval model.name=runs/a/final`
rebuilds the base the adapter was trained on, and the xxh3-128 checksums of the dir's other files.

Which dirs are verified: a dir with `slimtune_adapter.json` was written by slimtune; every file of it but that
manifest must be listed in its checksums and match before any is read (one without checksums is refused).
A dir without it was written by the peft library (which writes no checksums): it loads as PEFT loads it,
unverified (interop); its base_model_name_or_path is a model reference, not a file of the dir.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtune.adapters.base import AdapterFormat
from slimtune.adapters.dora import DoRALinear
from slimtune.adapters.inject import NEVER_ALL_LINEAR, adapter_modules, linear_kind, replace_module
from slimtune.adapters.lora import LoRALinear
from slimtune.adapters.pissa import peft_factors
from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir, dir_checksums, write_json
from slimtune.registry import ADAPTER_FORMATS

PREFIX = "base_model.model."
# PEFT LoraConfig options slimtune's LoRALinear does not implement: loading with any of them set would give
# a different model, so they must be at their default (None / False / "none" / empty)
UNSUPPORTED = (
    "fan_in_fan_out",
    "lora_bias",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "exclude_modules",
    "trainable_token_indices",
    "use_qalora",
    "target_parameters",
    "alora_invocation_tokens",
    "use_bdlora",
)


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in adapter_modules(model).items():
        A, B, _, _ = peft_factors(m)
        out[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous().clone()
        out[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous().clone()
        if isinstance(m, DoRALinear):
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().float().clone()
    return out


def _target_names(model: nn.Module) -> list[str]:
    """Short suffixes (q_proj, ...) when they pick exactly the wrapped modules, else full names."""
    wrapped = set(adapter_modules(model))
    suffixes = {n.rsplit(".", 1)[-1] for n in wrapped}
    picked = {
        n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in suffixes and (n in wrapped or linear_kind(m))
    }
    return sorted(suffixes) if picked == wrapped else sorted(wrapped)


def peft_config(model: nn.Module, adapter_cfg, base_path: str) -> dict:
    """adapter_cfg: the lora section. Rank and alpha are read off the modules (factors that came with the base may
    differ from lora.*);
    modules that differ from the first go to rank_pattern / alpha_pattern, as PEFT writes them."""
    modules = {n: peft_factors(m)[2:] for n, m in adapter_modules(model).items()}  # (rank, alpha) as saved
    first = next(iter(adapter_modules(model).values()), None)
    r, alpha = next(iter(modules.values()), (adapter_cfg.rank, adapter_cfg.alpha))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: mr for n, (mr, _) in modules.items() if mr != r},
        "alpha_pattern": {n: ma for n, (_, ma) in modules.items() if ma != alpha},
        "lora_dropout": adapter_cfg.dropout,
        "target_modules": _target_names(model),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": bool(first.use_rslora) if first is not None else adapter_cfg.use_rslora,
        "use_dora": isinstance(first, DoRALinear),
    }


def save_peft_adapter(
    model: nn.Module, adapter_cfg, out_dir: Path, model_name: str, base_path: str, quant: dict | None = None
) -> None:
    """Write the adapter atomically to out_dir (replacing an older one only once complete). quant: the
    base's QuantConfig fields when it was quantized (recorded in slimtune_adapter.json)."""
    with atomic_dir(out_dir) as tmp:
        save_file(peft_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", peft_config(model, adapter_cfg, base_path))
        write_metadata(tmp, {"format": "peft", "version": 2, "model_name": model_name, "quant": quant})


def write_metadata(adapter_dir: Path, meta: dict) -> None:
    """slimtune_adapter.json in a complete adapter dir: `meta` with the checksums of the dir's files now."""
    write_json(Path(adapter_dir) / "slimtune_adapter.json", {**meta, "checksums": dir_checksums(adapter_dir)})


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlimtuneError(f"{path} not found: not a LoRA adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimtuneError(f"{path}: corrupted JSON ({e}); re-export the adapter") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise SlimtuneError(
            f"{path}: peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; "
            "slimtune loads LORA adapters only"
        )
    for key in UNSUPPORTED:
        if cfg.get(key) not in (None, False, "none", [], {}):
            raise SlimtuneError(
                f"{path}: {key}={cfg[key]!r} is not supported by slimtune's LoRA; load this adapter with PEFT instead"
            )
    if cfg.get("bias", "none") != "none":
        raise SlimtuneError(
            f"{path}: bias={cfg['bias']!r} (trained biases) is not supported by slimtune's LoRA; "
            "load this adapter with PEFT instead"
        )
    if not isinstance(cfg.get("r"), int) or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise SlimtuneError(f"{path}: 'r' and 'lora_alpha' must be numbers; fix or re-export the adapter")
    return cfg


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name) gives the value."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_targets(model: nn.Module, targets, path: Path) -> list[str]:
    """PEFT's matching: a string is a regex over the full name (all-linear: every linear but lm_head); a list
    matches a name equal to an entry or ending in '.' + entry."""
    names = []
    for name, m in model.named_modules():
        if not name:
            continue
        if targets == "all-linear":
            hit = linear_kind(m) is not None and name.rsplit(".", 1)[-1] not in NEVER_ALL_LINEAR
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit and not isinstance(model.get_submodule(name.rpartition(".")[0]), LoRALinear):
            if linear_kind(m) is None and not isinstance(m, LoRALinear):
                raise SlimtuneError(
                    f"{path}: target module {name!r} is a {type(m).__name__}; slimtune's LoRA wraps linear layers only"
                )
            names.append(name)
    if not names:
        raise SlimtuneError(
            f"{path}: target_modules={targets!r} matches no module of the model; is "
            "base_model_name_or_path the model this adapter was trained on?"
        )
    return names


def load_peft_adapter(model: nn.Module, adapter_dir: Path) -> list[str]:
    """Wrap `model` with LoRA as described in adapter_dir and load its weights (PEFT format); returns the
    wrapped module names. Everything is frozen afterwards (an adapter loaded to score or merge). A dir
    slimtune wrote is verified against its checksums first (models.verify_adapter_files; see above)."""
    from slimtune.formats.hf import verify_adapter_files

    adapter_dir = Path(adapter_dir)
    verify_adapter_files(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    names = _peft_targets(model, cfg.get("target_modules") or [], cfg_path)
    path = adapter_dir / "adapter_model.safetensors"
    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise SlimtuneError(
            f"{path}: cannot read adapter weights ({e}); the checkpoint is missing or corrupted"
        ) from None
    for p in model.parameters():
        p.requires_grad_(False)
    saved: set[str] = set()
    for name in cfg.get("modules_to_save") or []:  # whole modules, trained and saved in full
        for n, m in model.named_modules():
            if n == name or n.endswith("." + name):
                saved |= _load_saved_module(m, n, state, path)
    for name in names:
        r = int(_pattern_value(cfg.get("rank_pattern"), name, cfg["r"]))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
        base = model.get_submodule(name)
        if r <= 0 or r > min(base.in_features, base.out_features):
            raise SlimtuneError(
                f"{cfg_path}: rank {r} for {name} is not in 1..{min(base.in_features, base.out_features)}"
            )
        cls = DoRALinear if cfg.get("use_dora") else LoRALinear
        if isinstance(base, LoRALinear):  # factors that came with the base (a compressed export's): replaced
            if bool(cfg.get("use_dora")) != isinstance(base, DoRALinear):
                raise SlimtuneError(
                    f"{cfg_path}: use_dora={bool(cfg.get('use_dora'))}, but the base carries "
                    f"{type(base).__name__} factors at {name}; is base_model_name_or_path right?"
                )
            if (base.rank, base.alpha) != (r, alpha):
                raise SlimtuneError(
                    f"{cfg_path}: {name} has rank {r} / alpha {alpha}, but the base carries factors of "
                    f"rank {base.rank} / alpha {base.alpha}; "
                    "is base_model_name_or_path the right base?"
                )
            continue
        replace_module(model, name, cls(base, r, alpha, use_rslora=bool(cfg.get("use_rslora"))))
    wanted = peft_state_dict(model)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise SlimtuneError(
            f"{path}: missing {len(missing)} tensors (e.g. {missing[0]}); adapter does not match the model"
        )
    unexpected = sorted(set(state) - set(wanted) - set(saved))
    if unexpected:
        raise SlimtuneError(
            f"{path}: tensor {unexpected[0]!r} ({len(unexpected)} in all) belongs to no LoRA module "
            "or modules_to_save entry of adapter_config.json; slimtune would ignore it, so it refuses "
            "to load (load this adapter with PEFT)"
        )
    with torch.no_grad():
        for name, m in adapter_modules(model).items():
            parts = {"lora_A.weight": m.lora_A.weight, "lora_B.weight": m.lora_B.weight}
            if isinstance(m, DoRALinear):
                parts["lora_magnitude_vector"] = m.lora_magnitude_vector
            for part, w in parts.items():
                t = state[f"{PREFIX}{name}.{part}"]
                if t.shape != w.shape:
                    raise SlimtuneError(
                        f"{path}: {name}.{part} has shape {tuple(t.shape)}, model expects {tuple(w.shape)}"
                    )
                w.copy_(t)
                w.requires_grad_(False)
    return names


def _load_saved_module(module: nn.Module, name: str, state: dict, path: Path) -> set[str]:
    """Replace `module`'s own parameters by the saved full copies (new Parameters: a tied weight, e.g.
    lm_head <-> embed_tokens, is untied, as PEFT's modules_to_save copy is)."""
    keys = set()
    for pname, p in list(module.named_parameters(recurse=False)):
        key = f"{PREFIX}{name}.{pname}"
        if key not in state:
            raise SlimtuneError(f"{path}: modules_to_save tensor {key!r} is missing")
        if tuple(state[key].shape) != tuple(p.shape):
            raise SlimtuneError(f"{path}: {key} has shape {tuple(state[key].shape)}, model expects {tuple(p.shape)}")
        setattr(module, pname, nn.Parameter(state[key].to(p.dtype), requires_grad=False))
        keys.add(key)
    return keys


ADAPTER_FORMATS.register("peft")(AdapterFormat(save=save_peft_adapter, load=load_peft_adapter))
