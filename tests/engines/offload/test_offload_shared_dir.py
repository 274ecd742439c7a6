"""A shared offload.dir: each run owns its subdirectory (named from its output dir), so runs one after the
other or at once never touch each other's files, and each resumes to the weights of its uninterrupted run
bit for bit; a second process on the same run is refused in one line; paths are absolute, so a resume from
another working directory with a relative offload.dir finds the run's snapshots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from slimtune_testutil import losses as _losses
from slimtune_testutil import run_cli
from slimtune_testutil import safetensors_dir as _weights

from slimtune.config import load_config
from slimtune.hooks import Hooks
from slimtune.trainer import run

# 4 steps, a checkpoint at step 2: resume=true on the finished run redoes steps 3 and 4 from its snapshot
ARGS = [
    "model.name=tiny-llama",
    "model.dtype=float32",
    "train.seq_len=64",
    "train.batch_size=2",
    "train.warmup_steps=2",
    "eval.max_batches=1",
    "logging.progress=false",
    "train.max_steps=4",
    "engine.name=offload",
    "checkpoint.every=2",
]

TOGETHER = """
import sys, time
from pathlib import Path
from slimtune.config import load_config
from slimtune.hooks import Hooks
from slimtune.trainer import run

mine, other = Path(sys.argv[1]), Path(sys.argv[2])

class Together(Hooks):
    def after_backward(self, model, step):
        if step == 2:  # both runs mid-step at once, their checkpoints and live stores side by side
            mine.touch()
            deadline = time.time() + 300
            while not other.exists():
                if time.time() > deadline:
                    raise SystemExit("the other run never got there")
                time.sleep(0.05)

run(load_config("full", sys.argv[3:]), hooks=[Together()])
"""


def _assert_same(a: dict, b: dict) -> None:
    assert a and a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:3]}"


def _resume_and_compare(outs: dict, shared: Path) -> None:
    """Each finished run resumed from its step-2 checkpoint ends with the same weights."""
    for seed, out in outs.items():
        finished = _weights(out / "final")
        run(
            load_config(
                "full", [*ARGS, f"train.seed={seed}", f"offload.dir={shared}", f"output_dir={out}", "resume=true"]
            )
        )
        _assert_same(_weights(out / "final"), finished)


def _two_runs_named_a(tmp_path) -> dict:
    return {1: tmp_path / "x" / "a", 2: tmp_path / "y" / "a"}  # different seeds: different weights


def test_two_runs_one_after_the_other_share_offload_dir(tmp_path):
    shared, outs = tmp_path / "nvme", _two_runs_named_a(tmp_path)
    for seed, out in outs.items():
        run(load_config("full", [*ARGS, f"train.seed={seed}", f"offload.dir={shared}", f"output_dir={out}"]))
    dirs = sorted(p.name for p in shared.iterdir())
    assert len(dirs) == 2 and all(d.startswith("a-") for d in dirs), dirs  # one per run, told apart by a hash
    for d in dirs:
        assert sorted(p.name for p in (shared / d / "snapshots").iterdir()) == ["step_2"]
        assert not (shared / d / "live").exists()
    _resume_and_compare(outs, shared)


def test_two_runs_at_once_share_offload_dir(tmp_path):
    shared, outs = tmp_path / "nvme", _two_runs_named_a(tmp_path)
    flags = {1: tmp_path / "at_step_2.1", 2: tmp_path / "at_step_2.2"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                TOGETHER,
                str(flags[seed]),
                str(flags[3 - seed]),
                *ARGS,
                f"train.seed={seed}",
                f"offload.dir={shared}",
                f"output_dir={out}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        )
        for seed, out in outs.items()
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    _resume_and_compare(outs, shared)


class SecondProcess(Hooks):
    """Mid-run, the same run started again in another process (resume=true twice, say)."""

    def __init__(self, args):
        self.args, self.result = args, None

    def after_backward(self, model, step):
        if step == 1:  # checkpoint step_1 exists, so the second process gets as far as the store
            self.result = run_cli("-m", "slimtune", "run", "full", *self.args, "resume=true", check=False)


def test_a_second_process_on_the_same_run_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    args = [*ARGS, "checkpoint.every=1", f"output_dir={out}"]
    second = SecondProcess(args)
    run(load_config("full", args), hooks=[second])
    r = second.result
    assert r is not None and r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert "offload.dir=" in last and f"output_dir={str(out)!r}" in last and "another process" in last, last
    assert len(_losses(out)) == 4 and (out / "final").is_dir()  # the first run went on undisturbed


def test_resume_from_another_directory_with_a_relative_offload_dir(tmp_path, monkeypatch):
    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    monkeypatch.chdir(tmp_path / "c1")
    run(load_config("full", [*ARGS, "offload.dir=st", "output_dir=out"]))
    state = json.loads((tmp_path / "c1" / "out" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert Path(state["offload"]).is_absolute() and Path(state["offload"]).is_relative_to(tmp_path / "c1" / "st")
    finished = _weights(tmp_path / "c1" / "out" / "final")
    monkeypatch.chdir(tmp_path / "c2")
    run(load_config("full", [*ARGS, "offload.dir=../c1/st", "output_dir=../c1/out", "resume=true"]))
    _assert_same(_weights(tmp_path / "c1" / "out" / "final"), finished)
    assert not (tmp_path / "c2" / "st").exists()


def test_a_moved_run_dir_resumes_from_its_own_store(tmp_path):
    """The default store lies inside output_dir; a run dir moved (or downloaded) elsewhere resumes from its own
    snapshots (its checkpoints name them by their old absolute paths), bit for bit, and keeps them."""
    import shutil

    old, new = tmp_path / "old" / "a", tmp_path / "new" / "a"
    run(load_config("full", [*ARGS, f"output_dir={old}"]))
    finished = _weights(old / "final")
    shutil.move(str(old.parent), str(new.parent))
    run(load_config("full", [*ARGS, f"output_dir={new}", "resume=true"]))
    _assert_same(_weights(new / "final"), finished)
    assert (new / "offload" / "snapshots" / "step_2").is_dir() and not old.parent.exists()
