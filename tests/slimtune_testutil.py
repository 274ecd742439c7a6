"""Shared test constants and helpers (a unique module name: tests/*/conftest.py files would shadow
`from conftest import ...`)."""

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


def free_port() -> int:
    """A TCP port free right now, for torchrun's --master_port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_kernels(monkeypatch, backend: str) -> None:
    """Select the kernel backend for one test (what train.kernels / SLIMTUNE_KERNELS set at start-up)."""
    from slimtune.kernels import dispatch

    monkeypatch.setattr(dispatch, "_backend", backend)
