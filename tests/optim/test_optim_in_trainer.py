"""The optimizers inside the trainer: recipes' keys, optimizer-in-backward, 8-bit states, exact resume."""

import json
import math

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


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("galore", ["galore.rank=8"]),
        ("galore", ["galore.rank=8", "galore.proj_dtype=bfloat16"]),
        ("galore", ["galore.rank=8", "galore.proj_dtype=int8"]),
        ("frugal", ["frugal.subspace=random"]),
        ("frugal", ["frugal.subspace=svd", "frugal.proj_dtype=int8"]),
        ("dct", ["dct.rank=8", "optim.state_bits=8"]),
        ("full", ["optim.state_bits=8"]),
    ],
)
def test_resume_is_bit_identical(tmp_path, tiny_overrides, recipe, extra):
    """A run stopped after its step-3 checkpoint and resumed gives the losses of an uninterrupted run,
    across a projection / subspace update (update_gap 2)."""
    gap = [f"{recipe}.update_gap=2"] if recipe != "full" else []
    common = [
        *tiny_overrides,
        "train.max_steps=6",
        "train.lr=1e-3",
        *gap,
        "checkpoint.every=3",
        "checkpoint.keep=2",
        *extra,
    ]
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
    with pytest.raises(
        C.ConfigError,
        match="train.grad_accum=2 needs gradients kept across micro-steps, which optim.in_backward=true does not give",
    ):
        C.load_config("full", ["optim.in_backward=true", "train.grad_accum=2", "train.max_grad_norm=0"])
    with pytest.raises(C.ConfigError, match="train.max_grad_norm=1.0 needs the whole gradient before the step"):
        C.load_config("full", ["optim.in_backward=true"])


class Shapes(Hooks):
    """The shapes of the trainable parameters (what the optimizer holds state for)."""

    def on_setup(self, model, optimizer, cfg):
        self.shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(self.shapes)


def expected_state_bytes(shapes, recipe, state_bits=32, rank=16, density=0.25) -> int:
    """Optimizer-state bytes counted from the definitions, independently of the optimizers' code: every
    parameter has a 4-byte fp32 `step` and two Adam moments; AdamW: moments of the parameter's shape;
    8-bit states only for >= 4096 values of a non-1-D parameter (1 byte a value + a 4-byte absmax per 256,
    per moment); galore / dct ("std" side, rank r = min(rank, m, n)): 2-D moments (m, r) when m >= n, else
    (r, n), plus P (r, n) / (m, r) fp32 (galore) or r int64 indices (dct); frugal (svd, density d):
    k = round(d * min(m, n)) in the same places, plus P fp32. Every parameter is low-rank when 2-D."""
    total = 0
    for shape in shapes:
        total += 4  # step
        numel = math.prod(shape)
        if recipe == "full" or len(shape) != 2:
            moment, extra = numel, 0
        else:
            m, n = shape
            r = min(rank, m, n) if recipe in ("galore", "dct") else round(density * min(m, n))
            moment = r * max(m, n)
            extra = 8 * r if recipe == "dct" else 4 * r * min(m, n)
        total += extra
        if state_bits == 8 and moment >= 4096 and len(shape) >= 2:
            total += 2 * (moment + 4 * math.ceil(moment / 256))
        else:
            total += 2 * 4 * moment
    return total


def test_8bit_states_track_fp32_states(tmp_path, tiny_overrides):
    common = [*tiny_overrides, "train.max_steps=12", "train.lr=3e-3", "checkpoint.every=0"]
    hooks = {"f": Shapes(), "q": Shapes()}
    run(C.load_config("full", [*common, f"output_dir={tmp_path / 'f'}"]), [hooks["f"]])
    run(C.load_config("full", [*common, "optim.state_bits=8", f"output_dir={tmp_path / 'q'}"]), [hooks["q"]])
    f, q = losses(tmp_path / "f"), losses(tmp_path / "q")
    assert q[-1] < q[0] - 0.1
    assert all(abs(x - y) <= 0.03 * x for x, y in zip(f, q)), (f, q)
    rf, rq = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("f", "q"))
    shapes = hooks["f"].shapes
    assert hooks["q"].shapes == shapes and sum(map(math.prod, shapes)) == rf["trainable_params"]
    # torch's AdamW: 2 fp32 moments (2 x 4 bytes) per trainable value + a 4-byte step per tensor
    assert rf["optimizer_state_bytes"] == 2 * 4 * rf["trainable_params"] + 4 * len(shapes)
    assert rq["optimizer_state_bytes"] == expected_state_bytes(shapes, "full", state_bits=8)
    assert any(math.prod(s) < 4096 and len(s) == 2 for s in shapes)  # the tiny model has fp32-state matrices
    assert rq["optimizer_state_bytes"] < 0.35 * rf["optimizer_state_bytes"]


@pytest.mark.parametrize("recipe", ["galore", "frugal", "dct"])
def test_lowrank_state_is_smaller_than_adamw(tmp_path, tiny_overrides, recipe):
    own = ["frugal.density=0.25"] if recipe == "frugal" else [f"{recipe}.rank=16"]
    common = [*tiny_overrides, "train.max_steps=2", "checkpoint.every=0", "optim.full_rank_modules=[]"]
    shapes = Shapes()
    assert main(["run", "full", *common, f"output_dir={tmp_path / 'adamw'}"]) == 0
    run(C.load_config(recipe, [*common, *own, f"output_dir={tmp_path / recipe}"]), [shapes])
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("adamw", recipe))
    assert rb["optimizer_state_bytes"] == expected_state_bytes(shapes.shapes, recipe)
    assert ra["optimizer_state_bytes"] == expected_state_bytes(shapes.shapes, "full")
    assert rb["optimizer_state_bytes"] < 0.45 * ra["optimizer_state_bytes"]
    # the projections / subspaces were computed (at step 0) and that time is part of the steps' time
    assert 0 < rb["projection_seconds"] < rb["wall_seconds"]
    assert "projection_seconds" not in ra


@pytest.mark.parametrize("recipe", ["galore", "frugal"])
def test_bf16_projection_halves_its_storage_and_tracks_fp32(tmp_path, tiny_overrides, recipe):
    import torch

    from slimtune.trainer.report import optimizer_state_bytes

    class Grab(Hooks):
        def after_step(self, model, optimizer, step):
            self.projs = [s["proj"] for s in optimizer.state.values() if "proj" in s]
            self.bytes = optimizer_state_bytes(optimizer)

    common = [*tiny_overrides, "train.max_steps=6", "train.lr=1e-3", "checkpoint.every=0"]
    common += ["galore.rank=16"] if recipe == "galore" else []
    runs = {}
    for dtype in ("float32", "bfloat16"):
        grab = Grab()
        run(C.load_config(recipe, [*common, f"{recipe}.proj_dtype={dtype}", f"output_dir={tmp_path / dtype}"]), [grab])
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

    common = [
        *tiny_overrides,
        "train.max_steps=6",
        "train.lr=1e-3",
        "checkpoint.every=0",
        f"{recipe}.update_gap=100",
    ] + (["galore.rank=16"] if recipe == "galore" else [])
    runs = {}
    for dtype in ("float32", "int8"):
        runs[dtype] = grab = Grab()
        run(C.load_config(recipe, [*common, f"{recipe}.proj_dtype={dtype}", f"output_dir={tmp_path / dtype}"]), [grab])
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
