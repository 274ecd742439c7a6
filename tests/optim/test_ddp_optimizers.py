"""Under torchrun (2 processes, gloo) every rank holds the same projection / subspace, optimizer state and
parameters after every step: projections come from the all-reduced gradient, random subspaces from a
generator seeded identically on every rank (while the ranks' global RNGs differ)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from slimtune_testutil import free_port

WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import torch, torch.distributed as dist
    from slimtune import config as C
    from slimtune.trainer import run
    from slimtune.trainer.hooks import Hooks
    from slimtune.io import flatten_state

    def digest(tensors):
        h = hashlib.sha256()
        for k in sorted(tensors):
            h.update(k.encode())
            h.update(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    class Check(Hooks):
        rows = []
        def after_step(self, model, optimizer, step):
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            state, _ = flatten_state(optimizer.state_dict())
            mine = [digest(params), digest(state), len(state)]
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            self.rows.append(every)

    out = sys.argv[1]
    cfg = C.load_config(sys.argv[2], sys.argv[3:])
    run(cfg, [Check()])
    if int(__import__("os").environ.get("RANK", "0")) == 0:  # run() has torn the process group down
        open(out, "w").write(json.dumps(Check.rows))
""")


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("galore", ["galore.rank=8"]),
        ("frugal", ["frugal.subspace=random"]),
        ("frugal", ["frugal.subspace=coordinates"]),
        ("dct", ["dct.rank=8", "optim.state_bits=8"]),
    ],
)
def test_every_rank_has_the_same_state_and_parameters(tmp_path, tiny_overrides, recipe, extra):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = tmp_path / "rows.json"
    args = [
        *tiny_overrides,
        "train.max_steps=4",
        "train.batch_size=2",
        "train.lr=1e-3",
        f"{recipe}.update_gap=2",
        "checkpoint.every=0",
        "eval.max_batches=1",
        *extra,
        f"output_dir={tmp_path / 'run'}",
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
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
            str(worker),
            str(result),
            recipe,
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(result.read_text())
    assert len(rows) == 4
    for step, (rank0, rank1) in enumerate(rows, 1):
        assert rank0[2] > 0, "optimizer state is empty"
        assert rank0 == rank1, f"ranks differ after step {step}"
    assert rows[0][0][0] != rows[-1][0][0]  # the parameters did move
