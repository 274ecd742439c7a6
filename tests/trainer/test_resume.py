"""A run SIGKILLed after step 10 and resumed gives, step for step, the losses of an uninterrupted run
(bitwise on CPU float32)."""

import json
import os
import subprocess
import sys
import textwrap

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
    return subprocess.run([sys.executable, "-m", "slimtune", *args], capture_output=True, text=True, env=env,
                          check=check, timeout=600)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_overrides):
    common = tiny_overrides + ["train.max_steps=20", "checkpoint.every=5", "checkpoint.keep=2",
                               "adapter.dropout=0.1", "train.lr=5e-3", "adapter.rank=4"]
    _slimtune("run", "lora", *common, f"output_dir={tmp_path / 'a'}")

    b = tmp_path / "b"
    killed = subprocess.run([sys.executable, "-c", KILLER, *common, f"output_dir={b}"],
                            capture_output=True, text=True, timeout=600)
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
