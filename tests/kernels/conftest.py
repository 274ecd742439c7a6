"""Kernel tests run the Triton kernels on CUDA, or on CPU under the Triton interpreter.

`@triton.jit` picks compiled or interpreted code when a kernel module is imported, so TRITON_INTERPRET=1
is set here, before the test modules (and through them the kernels) are imported. It is taken back after
collection so the rest of the suite keeps the torch references on CPU (slimtune's dispatch reads the
variable at every call), and set again around each kernel test. Without triton the kernel tests skip.
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = HAS_TRITON and not torch.cuda.is_available()
_PREVIOUS = os.environ.get("TRITON_INTERPRET")

if INTERPRET and _PREVIOUS is None:
    os.environ["TRITON_INTERPRET"] = "1"
    # A kernel module that another test package imported first holds compiled-mode kernels: redo it.
    for name in [name for name in sys.modules if name.startswith("slimtune.kernels.")]:
        importlib.reload(sys.modules[name])


def _in_kernels_dir(item) -> bool:
    return HERE in Path(item.fspath).parents


def pytest_collection_modifyitems(config, items):
    if HAS_TRITON:
        return
    skip = pytest.mark.skip(reason="triton is not installed (pip install triton)")
    for item in items:
        if _in_kernels_dir(item):
            item.add_marker(skip)


def pytest_collection_finish(session):
    if INTERPRET and _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 while a kernel test runs on a machine without CUDA."""
    if INTERPRET and _PREVIOUS is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
