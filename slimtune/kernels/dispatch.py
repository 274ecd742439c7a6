"""Which implementation a kernel op runs: the Triton kernel or its torch reference."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")


def kernel_backend() -> str:
    """SLIMTUNE_KERNELS: auto (default) | reference | triton."""
    value = os.environ.get("SLIMTUNE_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SLIMTUNE_KERNELS={value!r}: use one of {', '.join(BACKENDS)}")
    return value


def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors.

    auto: CUDA tensors and triton installed (or CPU tensors under TRITON_INTERPRET=1).
    triton: always (raises if triton is missing, or the tensors are on CPU without the interpreter).
    reference: never."""
    backend = kernel_backend()
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("SLIMTUNE_KERNELS=triton but triton is not installed (pip install triton)")
        if not on_cuda and not interpreting():
            raise RuntimeError("SLIMTUNE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return triton_available() and (on_cuda or interpreting())


def tile_size(dim: int, cap: int) -> int:
    """A power-of-two tile for `dim`: the next power of two, between 16 (tl.dot's minimum) and `cap`."""
    return max(16, min(cap, 1 << max(0, dim - 1).bit_length()))


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot input_precision: fp32 inputs follow torch's matmul TF32 switch (off by default); other
    dtypes take triton's default (None)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
