"""torchrun with 2 processes (gloo) == 1 process with the same global batch, and only rank 0 writes."""

import json
import os
import subprocess
import sys

from slimtune_testutil import free_port


def _losses(d):
    return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path, tiny_overrides):
    common = tiny_overrides + [
        "train.max_steps=5",
        "train.batch_size=2",
        "lora.dropout=0.0",
        "train.lr=5e-3",
        "lora.rank=4",
        "eval.max_batches=2",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "slimtune", "run", "lora", *common, "train.grad_accum=2", f"output_dir={one}"],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    two = tmp_path / "two"
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
            "lora",
            *common,
            "train.grad_accum=1",
            f"output_dir={two}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 5  # rank 1 wrote nothing extra
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert rb["world_size"] == 2
    assert abs(ra["eval_perplexity"] - rb["eval_perplexity"]) <= 1e-3 * ra["eval_perplexity"]
