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
    """Select the kernel backend for one test (what train.kernels / SLIMTUNE_KERNELS set at start-up): a fresh
    context variable defaulting to it, put back after the test."""
    import contextvars

    from slimtune.kernels import dispatch

    monkeypatch.setattr(dispatch, "BACKEND", contextvars.ContextVar("slimtune_kernels", default=backend))


def killer_script(recipe: str, after_backward_step: int) -> str:
    """Python source (for `python -c SRC key=value ...`) that runs `recipe` and SIGKILLs itself right after
    the backward of step `after_backward_step` + 1: mid-step, before its update, after earlier checkpoints."""
    return f"""
import os, signal, sys
from slimtune.config import load_config
from slimtune.trainer import run
from slimtune.hooks import Hooks

class KillMidStep(Hooks):
    def after_backward(self, model, step):
        if step == {after_backward_step}:
            os.kill(os.getpid(), signal.SIGKILL)

run(load_config({recipe!r}, sys.argv[1:]), hooks=[KillMidStep()])
"""


# the offload engine's tests: tiny-llama, 10 steps (tests/engines/offload)
OFFLOAD_BASE = [
    "model.name=tiny-llama",
    "model.dtype=float32",
    "train.seq_len=64",
    "train.warmup_steps=2",
    "eval.max_batches=2",
    "logging.progress=false",
    "train.max_steps=10",
    "train.lr=1e-3",
]


def run_cli(*args, check: bool = True):
    """`python *args` in a subprocess (offline wandb, one OpenMP thread); asserts exit 0 when check."""
    import os
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_kill_resume_bitwise(recipe: str, args: list, tmp_path, after_backward_step: int = 3) -> None:
    """A run of `recipe` killed (-9) mid-step after `after_backward_step` + 1 backwards and resumed has the losses
    and the final/ tensors of the same run uninterrupted, bit for bit."""
    import torch

    ref, b = tmp_path / "ref", tmp_path / "b"
    run_cli("-m", "slimtune", "run", recipe, *args, f"output_dir={ref}")
    killed = run_cli("-c", killer_script(recipe, after_backward_step), *args, f"output_dir={b}", check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_cli("-m", "slimtune", "run", recipe, *args, f"output_dir={b}", "resume=true")
    assert losses(b) == losses(ref)
    wa, wb = safetensors_dir(ref / "final"), safetensors_dir(b / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(out_dir) -> list[float]:
    """The loss column of a run's metrics.jsonl."""
    import json
    from pathlib import Path

    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def safetensors_dir(path) -> dict:
    """Every tensor of the *.safetensors files in a directory (a final/ or merged/ model), by name."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# tests/engines: a short full fine-tuning run, on 2 processes through torchrun, and its curve compared per step
ENGINE_RUN = [
    *TINY,
    "train.batch_size=2",
    "train.max_steps=6",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "eval.max_batches=3",
]


def torchrun2(recipe, *overrides):
    return run_cli(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "slimtune",
        "run",
        recipe,
        *ENGINE_RUN,
        *overrides,
    )


def close_curves(a, b, rel=1e-4, steps=6):
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


def sentencepiece_style_tokenizer(path):
    """A SentencePiece-style BPE (byte fallback, U+2581 for spaces, a prepended space) trained on pydoc text and
    laid out as transformers converts Llama 2's tokenizer.model: <unk> <s> </s>, 256 byte pieces, then merges."""
    import json

    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence(steps)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(list(topics.values())[:200], trainers.BpeTrainer(vocab_size=600, special_tokens=pieces))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in pieces[:3]]  # bytes: plain pieces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return fast
