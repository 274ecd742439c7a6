"""Save/load LoRA adapters in PEFT's on-disk format.

`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
(`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained(base, dir)` loads
what slimtune trained. `slimtune_adapter.json` beside them records the slimtune model name (PEFT
ignores it), so `slimtune eval model.name=runs/a/final` can find the base again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from slimtune.adapters import adapter_modules, apply_adapters
from slimtune.errors import SlimtuneError
from slimtune.trainer.io import atomic_dir, write_json

PREFIX = "base_model.model."


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in adapter_modules(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().clone()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().clone()
    return out


def _target_names(model: nn.Module) -> list[str]:
    """Short suffixes (q_proj, ...) when they pick exactly the wrapped modules, else full names."""
    from slimtune.adapters import linear_kind

    wrapped = set(adapter_modules(model))
    suffixes = {n.rsplit(".", 1)[-1] for n in wrapped}
    picked = {n for n, m in model.named_modules()
              if n.rsplit(".", 1)[-1] in suffixes and (n in wrapped or linear_kind(m))}
    return sorted(suffixes) if picked == wrapped else sorted(wrapped)


def peft_config(model: nn.Module, adapter_cfg, base_path: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": adapter_cfg.rank,
        "lora_alpha": adapter_cfg.alpha,
        "lora_dropout": adapter_cfg.dropout,
        "target_modules": _target_names(model),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


def save_peft_adapter(model: nn.Module, adapter_cfg, out_dir: Path, model_name: str, base_path: str) -> None:
    """Write the adapter atomically to out_dir (replacing an older one only once complete)."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file(peft_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", peft_config(model, adapter_cfg, base_path))
        write_json(tmp / "slimtune_adapter.json", {"model_name": model_name})


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise SlimtuneError(f"{path} not found: not a LoRA adapter directory") from None
    except json.JSONDecodeError as e:
        raise SlimtuneError(f"{path}: corrupted JSON ({e.msg}); re-export the adapter") from None
    if cfg.get("peft_type") != "LORA":
        raise SlimtuneError(f"{path}: peft_type={cfg.get('peft_type')!r}; slimtune loads LORA adapters only")
    return cfg


def load_peft_adapter(model: nn.Module, adapter_dir: Path) -> list[str]:
    """Wrap `model` with LoRA as described in adapter_dir and load its weights (PEFT format)."""
    from slimtune.config import AdapterConfig

    cfg = read_adapter_config(adapter_dir)
    targets = cfg["target_modules"]
    acfg = AdapterConfig(type="lora", rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=0.0,
                         target_modules=targets if isinstance(targets, str) else tuple(targets))
    names = apply_adapters(model, acfg)
    path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise SlimtuneError(f"{path}: cannot read adapter weights ({e}); the checkpoint is missing or corrupted") from None
    wanted = peft_state_dict(model)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise SlimtuneError(f"{path}: missing {len(missing)} tensors (e.g. {missing[0]}); adapter does not match the model")
    modules = adapter_modules(model)
    with torch.no_grad():
        for name, m in modules.items():
            for part in ("lora_A", "lora_B"):
                t = state[f"{PREFIX}{name}.{part}.weight"]
                w = getattr(m, part).weight
                if t.shape != w.shape:
                    raise SlimtuneError(f"{path}: {name}.{part} has shape {tuple(t.shape)}, model expects {tuple(w.shape)}")
                w.copy_(t)
    return names
