"""The optimizers inside the trainer: recipes' keys, optimizer-in-backward, 8-bit states, exact resume."""

import json

import pytest

from slimtune import config as C
from slimtune.cli import main
from slimtune.trainer import run
from slimtune.trainer.hooks import Hooks


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


class CrashAfterSave(Hooks):
    def on_save(self, path, step):
        raise RuntimeError(f"simulated crash after saving step {step}")


@pytest.mark.parametrize("recipe, extra", [("galore", ["optim.rank=8"]),
                                           ("galore", ["optim.rank=8", "optim.proj_dtype=bfloat16"]),
                                           ("galore", ["optim.rank=8", "optim.proj_dtype=int8"]),
                                           ("frugal", ["optim.subspace=random"]),
                                           ("frugal", ["optim.subspace=svd", "optim.proj_dtype=int8"]),
                                           ("dct", ["optim.rank=8", "optim.state_bits=8"]),
                                           ("full", ["optim.state_bits=8"])])
def test_resume_is_bit_identical(tmp_path, tiny_overrides, recipe, extra):
    """A run stopped after its step-3 checkpoint and resumed gives the losses of an uninterrupted run,
    across a projection / subspace update (update_gap 2)."""
    common = [*tiny_overrides, "train.max_steps=6", "train.lr=1e-3", "optim.update_gap=2", "checkpoint.every=3",
              "checkpoint.keep=2", *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    run(C.load_config(recipe, [*common, f"output_dir={a}"]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(C.load_config(recipe, [*common, f"output_dir={b}"]), [CrashAfterSave()])
    run(C.load_config(recipe, [*common, f"output_dir={b}", "resume=true"]))
    assert losses(a) == losses(b)


def test_in_backward_equals_the_ordinary_step(tmp_path, tiny_overrides):
    common = [*tiny_overrides, "train.max_steps=5", "train.lr=1e-3", "train.max_grad_norm=0", "checkpoint.every=0"]
    assert main(["run", "full", *common, f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(["run", "full", *common, "optim.in_backward=true", f"output_dir={tmp_path / 'b'}"]) == 0
    for x, y in zip(losses(tmp_path / "a"), losses(tmp_path / "b")):
        assert x == pytest.approx(y, rel=1e-5)


def test_in_backward_needs_accum_1_and_no_clipping():
    with pytest.raises(C.ConfigError, match="grad_accum=1"):
        C.load_config("full", ["optim.in_backward=true", "train.grad_accum=2", "train.max_grad_norm=0"])
    with pytest.raises(C.ConfigError, match="max_grad_norm=0"):
        C.load_config("full", ["optim.in_backward=true"])


def test_8bit_states_track_fp32_states(tmp_path, tiny_overrides):
    common = [*tiny_overrides, "train.max_steps=12", "train.lr=3e-3", "checkpoint.every=0"]
    assert main(["run", "full", *common, f"output_dir={tmp_path / 'f'}"]) == 0
    assert main(["run", "full", *common, "optim.state_bits=8", f"output_dir={tmp_path / 'q'}"]) == 0
    f, q = losses(tmp_path / "f"), losses(tmp_path / "q")
    assert q[-1] < q[0] - 0.1
    assert all(abs(x - y) <= 0.03 * x for x, y in zip(f, q)), (f, q)
    rf, rq = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("f", "q"))
    assert rq["optimizer_state_bytes"] < 0.3 * rf["optimizer_state_bytes"]


@pytest.mark.parametrize("recipe", ["galore", "frugal", "dct"])
def test_lowrank_state_is_smaller_than_adamw(tmp_path, tiny_overrides, recipe):
    common = [*tiny_overrides, "train.max_steps=2", "checkpoint.every=0", "optim.full_rank_modules=[]",
              "optim.rank=16", "optim.density=0.25"]
    assert main(["run", "full", *common, f"output_dir={tmp_path / 'adamw'}"]) == 0
    assert main(["run", recipe, *common, f"output_dir={tmp_path / recipe}"]) == 0
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("adamw", recipe))
    assert rb["optimizer_state_bytes"] < 0.45 * ra["optimizer_state_bytes"]
    assert rb["projection_seconds"] >= 0


@pytest.mark.parametrize("recipe", ["galore", "frugal"])
def test_bf16_projection_halves_its_storage_and_tracks_fp32(tmp_path, tiny_overrides, recipe):
    import torch

    from slimtune.trainer.report import optimizer_state_bytes

    class Grab(Hooks):
        def after_step(self, model, optimizer, step):
            self.projs = [s["proj"] for s in optimizer.state.values() if "proj" in s]
            self.bytes = optimizer_state_bytes(optimizer)

    common = [*tiny_overrides, "train.max_steps=6", "train.lr=1e-3", "checkpoint.every=0", "optim.rank=16"]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        grab = Grab()
        run(C.load_config(recipe, [*common, f"optim.proj_dtype={dtype}", f"output_dir={tmp_path / dtype}"]), [grab])
        runs[dtype] = grab
        assert grab.projs and all(p.dtype == getattr(torch, dtype) for p in grab.projs)
    proj_bytes = sum(p.numel() * 4 for p in runs["float32"].projs)
    assert runs["float32"].bytes - runs["bfloat16"].bytes == proj_bytes // 2
    f, b = losses(tmp_path / "float32"), losses(tmp_path / "bfloat16")
    assert all(abs(x - y) <= 1e-2 * x for x, y in zip(f, b)), (f, b)


@pytest.mark.parametrize("recipe", ["galore", "frugal"])
def test_int8_projection_quarters_its_storage_and_tracks_fp32(tmp_path, tiny_overrides, recipe):
    """Q-GaLore-style P: int8 codes + one fp32 scale per basis vector, within 1/254 of each vector's
    absmax of the fp32 P computed from the same gradient, and the same loss curve to 1%."""
    import torch

    from slimtune.optim.projected import load_projection
    from slimtune.trainer.report import optimizer_state_bytes

    class Grab(Hooks):
        def after_step(self, model, optimizer, step):
            self.states = [s for s in optimizer.state.values() if "proj" in s or "proj_q_int8" in s]
            self.bytes = optimizer_state_bytes(optimizer)

    common = [*tiny_overrides, "train.max_steps=6", "train.lr=1e-3", "checkpoint.every=0", "optim.rank=16",
              "optim.update_gap=100"]
    runs = {}
    for dtype in ("float32", "int8"):
        runs[dtype] = grab = Grab()
        run(C.load_config(recipe, [*common, f"optim.proj_dtype={dtype}", f"output_dir={tmp_path / dtype}"]), [grab])
        assert grab.states
    f32 = [s["proj"] for s in runs["float32"].states]
    q = runs["int8"].states
    assert all(s["proj_q_int8"].dtype == torch.int8 and "proj" not in s for s in q)
    for full, s in zip(f32, q):  # P is computed once (step 0) from identical gradients in both runs
        dim = 1 if full.shape[1] >= full.shape[0] else 0
        bound = full.abs().amax(dim=dim, keepdim=True) / 254 + 1e-7
        assert ((load_projection(s) - full).abs() <= bound).all()
    proj_elems = sum(p.numel() for p in f32)
    scales = sum(s["proj_scale"].numel() for s in q)
    assert runs["float32"].bytes - runs["int8"].bytes == proj_elems * 3 - scales * 4
    a, b = losses(tmp_path / "float32"), losses(tmp_path / "int8")
    assert all(abs(x - y) <= 1e-2 * x for x, y in zip(a, b)), (a, b)
