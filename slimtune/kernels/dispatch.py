"""Which implementation a kernel op runs: the Triton kernel or its torch reference.

The backend is a context variable (contextvars: per thread and task, inherited by what copies the context),
set at start-up from `train.kernels` (`configure`), with the environment variable SLIMTUNE_KERNELS as an
override, or for a block of code with `with using("reference"):`. Code that sets neither (a library user, a
test) gets SLIMTUNE_KERNELS or "auto".
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import sys
import warnings

import torch

from slimtune.schema import KERNEL_BACKENDS as BACKENDS
from slimtune.errors import ConfigError

ENV = "SLIMTUNE_KERNELS"
BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("slimtune_kernels", default=None)


def _from_env(default: str) -> str:
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return default
    if value not in BACKENDS:
        raise ConfigError(
            f"{ENV}={os.environ[ENV]!r} is not one of: {', '.join(BACKENDS)}; fix or unset the "
            "environment variable (train.kernels selects the backend too)"
        )
    return value


def configure(requested: str = "auto", device: torch.device | None = None) -> str:
    """Set the backend for this process: SLIMTUNE_KERNELS if set (validated: ConfigError), else `requested`
    (train.kernels). Warns about a leftover TRITON_INTERPRET=1 on a real run (CUDA, or CPU with auto)."""
    backend = _from_env(requested)
    BACKEND.set(backend)
    if interpreting() and (device is None or device.type == "cuda" or backend == "auto"):
        warnings.warn(
            "TRITON_INTERPRET=1 is set: Triton kernels run in the (very slow) interpreter; unset it "
            "unless you are testing kernels",
            stacklevel=2,
        )
    return backend


@contextlib.contextmanager
def using(backend: str):
    """The kernel ops inside the block run `backend` (auto | reference | triton); the previous one after."""
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    token = BACKEND.set(backend)
    try:
        yield
    finally:
        BACKEND.reset(token)


def kernel_backend() -> str:
    """auto | reference | triton: configure() / using(), else SLIMTUNE_KERNELS, else auto."""
    backend = BACKEND.get()
    return backend if backend is not None else _from_env("auto")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_enabled() -> bool:
    """Whether a kernel module imports triton and defines its kernels: installed, and CUDA present or the
    interpreter on. A CPU-only run never imports triton (~70 MiB of resident libraries it would not use)."""
    return triton_available() and (torch.cuda.is_available() or interpreting())


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors.

    auto: CUDA tensors and triton installed (or CPU tensors under TRITON_INTERPRET=1).
    triton: always (ConfigError if triton is missing, or the tensors are on CPU without the interpreter).
    reference: never."""
    backend = kernel_backend()
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_available():
            raise ConfigError(
                "train.kernels=triton (or SLIMTUNE_KERNELS=triton) but triton is not installed: "
                "pip install triton, or use train.kernels=auto"
            )
        if not on_cuda and not interpreting():
            raise ConfigError(
                "train.kernels=triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter); "
                "use train.kernels=auto on CPU"
            )
        if "triton" not in sys.modules:
            raise ConfigError(
                "TRITON_INTERPRET=1 was set after slimtune's kernels were imported without CUDA; "
                "set it before starting Python"
            )
        return True
    return triton_available() and (on_cuda or (interpreting() and "triton" in sys.modules))


def tile_size(dim: int, cap: int) -> int:
    """A power-of-two tile for `dim`: the next power of two, between 16 (tl.dot's minimum) and `cap`."""
    return max(16, min(cap, 1 << max(0, dim - 1).bit_length()))


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot input_precision: fp32 inputs follow torch's matmul TF32 switch (off by default); other
    dtypes take triton's default (None)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
