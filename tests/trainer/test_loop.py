"""Loop pieces: the lr schedule against its formula, bf16 autocast training, grad accumulation."""

import json
import math

import pytest

from slimtune.cli import main
from slimtune.config import TrainConfig
from slimtune.trainer.loop import lr_at


def test_warmup_then_cosine():
    t = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 15):
        p = (s - 4) / 10
        assert lr_at(s, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    assert lr_at(14, t) == pytest.approx(0.1)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_autocast_tracks_fp32(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "train.max_steps=8", "train.lr=1e-2", "lora.dropout=0.0"]
    assert main(["run", "lora", *args, f"output_dir={tmp_path / 'f'}"]) == 0
    assert main(["run", "lora", *args, "model.dtype=bfloat16", f"output_dir={tmp_path / 'b'}"]) == 0
    f, b = _losses(tmp_path / "f"), _losses(tmp_path / "b")
    assert b[-1] < b[0]
    assert all(abs(x - y) < 0.05 * x for x, y in zip(f, b)), (f, b)


def test_grad_accum_equals_bigger_batch(tmp_path, tiny_overrides):
    """batch 4 x accum 2 == batch 8 x accum 1: the same global batch and one token-mean loss."""
    args = [*tiny_overrides, "train.max_steps=4", "train.lr=1e-2", "lora.dropout=0.0"]
    assert main(["run", "lora", *args, "train.batch_size=4", "train.grad_accum=2", f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(["run", "lora", *args, "train.batch_size=8", "train.grad_accum=1", f"output_dir={tmp_path / 'b'}"]) == 0
    for x, y in zip(_losses(tmp_path / "a"), _losses(tmp_path / "b")):
        assert x == pytest.approx(y, rel=1e-5)
