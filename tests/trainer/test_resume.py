"""A run SIGKILLed after step 10 and resumed gives, step for step, the losses of an uninterrupted run
(bitwise on CPU float32)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

KILLER = textwrap.dedent("""
    import os, signal, sys
    from slimtune.config import load_config
    from slimtune.trainer import run
    from slimtune.trainer.hooks import Hooks

    class KillAfter(Hooks):
        def on_save(self, path, step):
            if step == 10:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash

    run(load_config("lora", sys.argv[1:]), hooks=[KillAfter()])
""")


def _losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path).read().splitlines())]


def _slimtune(*args, check=True):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "slimtune", *args], capture_output=True, text=True, env=env, check=check, timeout=600
    )


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_overrides):
    common = tiny_overrides + [
        "train.max_steps=20",
        "checkpoint.every=5",
        "checkpoint.keep=2",
        "lora.dropout=0.1",
        "train.lr=5e-3",
        "lora.rank=4",
    ]
    _slimtune("run", "lora", *common, f"output_dir={tmp_path / 'a'}")

    b = tmp_path / "b"
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *common, f"output_dir={b}"], capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [s for s, _ in _losses(b / "metrics.jsonl")] == list(range(1, 11))
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_10", "step_5"]
    assert not (b / "report.json").exists()

    # a newer checkpoint dir without its completion marker must be ignored with a warning
    (b / "checkpoints" / "step_15").mkdir()
    (b / "checkpoints" / "step_15" / "trainable.safetensors").write_bytes(b"partial")

    resumed = _slimtune("run", "lora", *common, f"output_dir={b}", "resume=true")
    assert "ignoring incomplete checkpoint" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step_10" in resumed.stdout

    ref, got = _losses(tmp_path / "a" / "metrics.jsonl"), _losses(b / "metrics.jsonl")
    assert [s for s, _ in got] == list(range(1, 21))
    assert got == ref  # exact float equality, step for step
    report = json.loads((b / "report.json").read_text())
    assert report["steps"] == 20 and report["initial_loss"] == ref[0][1]


def test_existing_run_is_not_overwritten(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    r = _slimtune("run", "lora", *tiny_overrides, "train.max_steps=2", f"output_dir={out}", check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "already holds a run" in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    args = tiny_overrides + ["train.max_steps=4", "checkpoint.every=2", f"output_dir={out}"]
    _slimtune("run", "lora", *args)
    ckpt = out / "checkpoints" / "step_2"
    (ckpt / "optimizer.safetensors").write_bytes(b"\x01garbage")
    r = _slimtune("run", "lora", *args, "resume=true", "train.max_steps=6", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "is corrupted" in r.stderr and "Traceback" not in r.stderr


def test_resume_without_checkpoint_is_an_error_and_keeps_metrics(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    r = _slimtune("run", "lora", *tiny_overrides, "train.max_steps=2", f"output_dir={out}", "resume=true", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "resume=true but" in r.stderr and "no complete checkpoint" in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # not truncated


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 4-step run with a checkpoint at step 2 (batch 4 x accum 1), and the same run for 6 steps."""
    from slimtune_testutil import TINY

    root = tmp_path_factory.mktemp("resume")
    common = TINY + ["train.lr=5e-3", "lora.rank=4", "lora.dropout=0.0", "checkpoint.every=2"]
    _slimtune("run", "lora", *common, "train.max_steps=4", f"output_dir={root / 'a'}")
    _slimtune("run", "lora", *common, "train.max_steps=6", f"output_dir={root / 'ref'}")
    return root, common


@pytest.mark.parametrize(
    "change, key",
    [
        ("train.seq_len=32", "train.seq_len"),
        ("data.eval_fraction=0.1", "data.eval_fraction"),
        ("lora.rank=8", "lora.rank"),
        ("quant.method=nf4", "quant.method"),
        ("optim.name=sgd", "optim.name"),
        ("train.seed=1", "train.seed"),
        ("train.batch_size=2", "global batch"),
    ],
)
def test_resume_refuses_a_change_of_data_order_or_state(checkpointed, change, key, capsys):
    from slimtune.cli import main

    root, common = checkpointed
    before = (root / "a" / "metrics.jsonl").read_text()
    assert main(["run", "lora", *common, "train.max_steps=6", f"output_dir={root / 'a'}", "resume=true", change]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("slimtune: error: resume:") and key in lines[0], lines
    assert (root / "a" / "metrics.jsonl").read_text() == before


def test_resume_with_same_global_batch_and_new_lr_schedule(checkpointed, tmp_path):
    """batch 4 x accum 1 -> batch 2 x accum 2 (the same global batch) and a longer max_steps: allowed, and the
    resumed steps see the same data as an uninterrupted run (losses equal up to summation order)."""
    import shutil

    root, common = checkpointed
    run = tmp_path / "b"
    shutil.copytree(root / "a", run)
    shutil.rmtree(run / "checkpoints" / "step_4", ignore_errors=True)  # resume from step 2
    _slimtune(
        "run",
        "lora",
        *common,
        "train.max_steps=6",
        f"output_dir={run}",
        "resume=true",
        "train.batch_size=2",
        "train.grad_accum=2",
        "eval.every=0",
    )
    got, ref = _losses(run / "metrics.jsonl"), _losses(root / "ref" / "metrics.jsonl")
    assert [s for s, _ in got] == list(range(1, 7))
    for (s, x), (_, y) in zip(got, ref):
        assert abs(x - y) <= 1e-5 * abs(y), (s, x, y)


def test_checkpoints_hold_no_rng_state_and_files_are_world_readable(checkpointed):
    """The loop reseeds from (seed, step, rank): no RNG file. Files 0644 / dirs 0755 under umask 022."""
    import stat

    root, _ = checkpointed
    ckpt = root / "a" / "checkpoints" / "step_2"
    assert not (ckpt / "rng.safetensors").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 1
    old = os.umask(0o022)
    os.umask(old)
    assert old == 0o022, "this test assumes the default umask"
    for p in [root / "a", ckpt, root / "a" / "final", *(root / "a").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
