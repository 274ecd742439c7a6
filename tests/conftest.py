import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Overrides that turn any recipe into a few-second CPU run on the tiny random Llama.
TINY = [
    "model.name=tiny-llama",
    "model.dtype=float32",
    "train.seq_len=64",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "eval.max_batches=2",
    "logging.progress=false",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from slimtune.models import resolve_model_dir

    return resolve_model_dir("tiny-llama")


def free_port() -> int:
    """A TCP port free right now, for torchrun's --master_port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
