import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from slimtune_testutil import TINY  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)


def _import_triton_for_the_interpreter() -> None:
    """Without CUDA the kernel tests run under TRITON_INTERPRET=1, which triton reads when its own
    @jit helpers (tl.cdiv, ...) are decorated, i.e. at its first import. Some test module may import
    triton indirectly before tests/kernels/conftest.py sets the variable, so import it here first, in
    interpreter mode, and take the variable back (tests/kernels/conftest.py sets it around kernel tests)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_for_the_interpreter()


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from slimtune.formats.hf import resolve_model_dir

    return resolve_model_dir("tiny-llama")
