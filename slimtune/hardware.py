"""`model.dtype=auto`: bf16 compute where the hardware multiplies bf16 fast, fp32 elsewhere.

CUDA: torch.cuda.is_bf16_supported (native, not emulated). CPU: the avx512_bf16 or amx_bf16 flag in
/proc/cpuinfo (AVX2-only CPUs run bf16 matmuls ~25x slower than fp32). Frozen weights stay stored
compressed either way; only the compute / storage dtype of the full-precision parts follows the choice.

`slimtune run` resolves auto per the hardware; eval, generate, export, quantize and prune compute in fp32
unless model.dtype is given on their command line (exact comparisons with transformers stay exact).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags (the first `flags` line of /proc/cpuinfo); empty when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_choice(flags: set[str]) -> tuple[str, str]:
    """(dtype, reason) for a CPU with these flags."""
    fast = [f for f in CPU_BF16_FLAGS if f in flags]
    if fast:
        return "bfloat16", f"CPU has {'+'.join(fast)} (fast bf16 matmul)"
    if not flags:
        return "float32", "CPU flags unknown (no /proc/cpuinfo): fp32"
    return "float32", "CPU has no avx512_bf16/amx_bf16 (bf16 matmul would be slow): fp32"


@functools.lru_cache(maxsize=None)
def detect(device_type: str) -> tuple[str, str]:
    """(dtype, reason) for compute on `device_type` ("cpu" or "cuda") of this machine."""
    if device_type == "cuda":
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation argument
            ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name()
        return ("bfloat16", f"CUDA {name} supports bf16") if ok else ("float32", f"CUDA {name} lacks bf16: fp32")
    return cpu_choice(cpu_flags())


def _device_type(cfg) -> str:
    want = cfg.train.device
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_dtype(cfg, device: torch.device | str | None = None, auto: str = "hardware", resumed: str | None = None):
    """(cfg with a concrete model.dtype, {"dtype", "reason"}). A concrete model.dtype is kept. For "auto":
    resumed (the dtype a checkpoint's run used) wins, then auto="hardware" detects, auto="float32" is the
    fp32 default of eval / generate / export / quantize / prune."""
    dtype = cfg.model.dtype
    if dtype != "auto":
        return cfg, {"dtype": dtype, "reason": f"model.dtype={dtype} given"}
    if resumed and resumed != "auto":
        dtype, reason = resumed, f"model.dtype=auto: {resumed}, as the checkpoint resumed from"
    elif auto == "hardware":
        kind = torch.device(device).type if device is not None else _device_type(cfg)
        dtype, reason = detect(kind)
        reason = f"model.dtype=auto: {reason}"
    else:
        dtype, reason = "float32", "model.dtype not given: fp32 (exact)"
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype)), {
        "dtype": dtype,
        "reason": reason,
    }


def fixed_dtype(cfg):
    """cfg with model.dtype=auto taken as float32 (eval / generate / export / quantize / prune default)."""
    return resolve_dtype(cfg, auto="float32")[0]
