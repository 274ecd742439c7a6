"""Nothing outlives a run: however run() ends (finished, a hook raising mid-step, an update failing on the
worker thread), the engine is closed: its update and I/O threads have stopped, nothing keeps the engine or
its buffer pool alive, the run's lock is released (a resume in the same process starts) and the
checkpoints stay."""

import gc
import threading
import weakref

import pytest
from slimtune_testutil import losses as _losses

from slimtune.config import load_config
from slimtune.hooks import Hooks
from slimtune.engines.offload import store as S
from slimtune.trainer import run
from slimtune.formats.checkpoint import complete_checkpoints
from slimtune.engines.offload.engine import OffloadEngine

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
    "checkpoint.every=1",
    "checkpoint.keep=2",
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(S, "CHUNK", 4096)


@pytest.fixture
def tracked(monkeypatch):
    """Weak references to every OffloadEngine built, and to its BufferPool; the threads alive before."""
    from tqdm import tqdm

    tqdm(disable=True).close()  # tqdm's monitor thread (process-wide, started by the first bar) is not the run's
    refs = []
    init = OffloadEngine.__init__

    def tracking(self, *args, **kwargs):
        init(self, *args, **kwargs)
        refs.append((weakref.ref(self), weakref.ref(self.pool)))

    monkeypatch.setattr(OffloadEngine, "__init__", tracking)
    return refs, set(threading.enumerate())


def _nothing_left(tracked):
    refs, threads = tracked
    gc.collect()
    assert refs, "no offload engine was built"
    assert all(engine() is None and pool() is None for engine, pool in refs), "the engine or its pool outlived run()"
    left = set(threading.enumerate()) - threads
    assert not left, f"threads outlived run(): {sorted(t.name for t in left)}"


class RaiseAt(Hooks):
    def __init__(self, step: int):
        self.step = step

    def after_backward(self, model, step):
        if step == self.step:
            raise RuntimeError("injected")


def test_a_finished_run_leaves_no_thread_and_no_engine(tmp_path, tracked):
    run(load_config("full", [*ARGS, f"output_dir={tmp_path / 'run'}"]))
    _nothing_left(tracked)
    assert not (tmp_path / "run" / "offload" / "live").exists()


def test_a_hook_raising_mid_step_closes_the_engine_and_keeps_the_checkpoints(tmp_path, tracked):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        run(load_config("full", [*ARGS, f"output_dir={out}"]), hooks=[RaiseAt(2)])
    _nothing_left(tracked)
    kept = complete_checkpoints(out / "checkpoints")
    assert [d.name for d in kept] == ["step_1", "step_2"]
    assert sorted(p.name for p in (out / "offload" / "snapshots").iterdir()) == ["step_1", "step_2"]
    assert not (out / "offload" / "live").exists()
    run(load_config("full", [*ARGS, f"output_dir={out}", "resume=true"]))  # the lock was released
    assert len(_losses(out)) == 4


def test_an_update_failing_on_the_worker_thread_closes_the_engine(tmp_path, tracked, monkeypatch):
    from slimtune.engines.offload.update import UnitOptimizer

    step, calls = UnitOptimizer.step, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # in the second step's backward
            raise RuntimeError("injected")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UnitOptimizer, "step", failing)
    with pytest.raises(RuntimeError, match="injected"):  # no clipping: updates run on the worker, in backward
        run(load_config("full", [*ARGS, "train.max_grad_norm=0", f"output_dir={tmp_path / 'run'}"]))
    _nothing_left(tracked)


def test_any_engine_is_closed_when_run_raises(tmp_path, monkeypatch):
    from slimtune.engines.ddp import Engine

    closed = []
    monkeypatch.setattr(Engine, "close", lambda self: closed.append(self))
    args = [a for a in ARGS if not a.startswith(("offload.", "engine."))]  # the in-memory engine
    with pytest.raises(RuntimeError, match="injected"):
        run(load_config("full", [*args, f"output_dir={tmp_path / 'run'}"]), hooks=[RaiseAt(1)])
    assert len(closed) == 1
