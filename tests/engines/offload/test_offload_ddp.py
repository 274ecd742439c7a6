"""Under torchrun (2 processes, gloo) offloaded training equals in-memory DDP bit for bit: each rank streams
its own store and reduces each unit's gradients as DDP does (x 1/world, then summed) before the update."""

import json
import os
import subprocess
import sys

import pytest
import torch
from slimtune_testutil import free_port, safetensors_dir as _weights

BASE = [
    "model.dtype=float32",
    "train.seq_len=64",
    "train.batch_size=2",
    "train.warmup_steps=2",
    "eval.max_batches=2",
    "logging.progress=false",
    "train.max_steps=4",
    "train.lr=1e-3",
]


def _torchrun(recipe, args, out):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
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
            *args,
            f"output_dir={out}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "recipe, extra, disk",
    [
        ("full", ["train.max_grad_norm=0.5"], ["engine.name=offload"]),
        ("full", ["train.max_grad_norm=0", "train.grad_accum=2"], ["engine.name=offload", "offload.prefetch=1"]),
        ("lora", ["lora.rank=4"], ["engine.name=offload", "engine.optimizer=none"]),
    ],
)
def test_torchrun_offload_equals_ddp(recipe, extra, disk, tmp_path, request):
    model = (
        [f"model.name={request.getfixturevalue('deep_tiny')}"]
        if "offload.prefetch=1" in disk
        else ["model.name=tiny-llama"]
    )
    mem = _torchrun(recipe, [*model, *BASE, *extra], tmp_path / "mem")
    off = _torchrun(recipe, [*model, *BASE, *extra, *disk], tmp_path / "off")
    assert off == mem and len(off) == 4
    a, b = _weights(tmp_path / "mem" / "final"), _weights(tmp_path / "off" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_offload_resume_restores_every_rank(tmp_path):
    """Every rank restores rank 0's snapshot into its own store: resuming a finished 6-step run from its step-4
    checkpoint redoes steps 5 and 6 with the same losses."""
    args = [
        "model.name=tiny-llama",
        *BASE,
        "train.max_grad_norm=0",
        "engine.name=offload",
        "checkpoint.every=2",
        "checkpoint.keep=2",
        "train.max_steps=6",
    ]
    ref = _torchrun("full", args, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_2", "step_4"]
    got = _torchrun("full", [*args, "resume=true"], tmp_path / "run")
    assert got == ref
