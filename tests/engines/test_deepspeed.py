"""engine.name=deepspeed on 2 processes (gloo): ZeRO-1, 2 and 3 full fine-tuning follow DDP step for step;
a run saved on 2 processes resumes on 1 at every stage (ZeRO-0 in bf16: DeepSpeed's bf16 optimizer) with slimtune's
safetensors checkpoint, not DeepSpeed's pickles;
the generated DeepSpeed JSON round-trips with a user's own and carries the NVMe settings."""

import json
import os
import shutil

import pytest
import torch

from slimtune.cli import main
from slimtune_testutil import ENGINE_RUN, close_curves, losses, safetensors_dir, torchrun2

pytest.importorskip("deepspeed")

RUN = ENGINE_RUN
_torchrun, _close = torchrun2, close_curves


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    _torchrun("full", "checkpoint.every=0", f"output_dir={root / 'ddp'}")
    for stage in (1, 2, 3):
        _torchrun(
            "full",
            "engine.name=deepspeed",
            f"deepspeed.zero_stage={stage}",
            "checkpoint.every=3",
            f"output_dir={root / f'z{stage}'}",
        )
    _torchrun("full", *BF16_ZERO0, "checkpoint.every=3", f"output_dir={root / 'z0_bf16'}")
    return root


BF16_ZERO0 = ["engine.name=deepspeed", "deepspeed.zero_stage=0", "model.dtype=bfloat16"]


@pytest.mark.parametrize("stage", ["z1", "z2", "z3"])
def test_zero_follows_ddp(runs, stage):
    _close(losses(runs / stage), losses(runs / "ddp"))
    a, b = safetensors_dir(runs / stage / "final"), safetensors_dir(runs / "ddp" / "final")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    used = json.loads((runs / stage / "deepspeed.json").read_text())
    assert used["zero_optimization"]["stage"] == int(stage[1])
    assert used["train_batch_size"] == 2 * 1 * 2 and used["gradient_clipping"] == 1.0


@pytest.mark.parametrize("stage", ["z1", "z2", "z3", "z0_bf16"])
def test_saved_on_two_resumes_on_one(runs, tmp_path, stage):
    """ZeRO 1-3 partition the optimizer state (and ZeRO-3 the weights) over the 2 ranks: the checkpoint holds
    them whole, so one process with grad_accum 2 continues the curve."""
    out = tmp_path / "resumed"
    shutil.copytree(runs / stage, out)
    shutil.rmtree(out / "final")
    ckpt = out / "checkpoints" / "step_3"
    assert (ckpt / "optimizer.safetensors").is_file() and not list(ckpt.rglob("*.pt"))
    engine = BF16_ZERO0 if stage == "z0_bf16" else ["engine.name=deepspeed", f"deepspeed.zero_stage={stage[1]}"]
    assert (
        main(
            [
                "run",
                "full",
                *RUN,
                *engine,
                "checkpoint.every=3",
                "train.grad_accum=2",
                "resume=true",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    _close(losses(out), losses(runs / stage))
    a, b = safetensors_dir(out / "final"), safetensors_dir(runs / stage / "final")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_generated_config_round_trips_with_ones_own(tmp_path):
    from slimtune.config import load_config
    from slimtune.engines.deepspeed import DeepSpeedEngine, deepspeed_config
    from slimtune.model.pipeline import engine_setup

    own = tmp_path / "ds.json"
    own.write_text(
        json.dumps(
            {
                "zero_optimization": {"reduce_bucket_size": 12345},
                "communication_data_type": "fp32",
                "train_micro_batch_size_per_gpu": 99,
            }
        )
    )
    cfg = load_config(
        "full",
        [
            *RUN,
            "engine.name=deepspeed",
            "deepspeed.zero_stage=3",
            "engine.params=disk",
            "engine.optimizer=disk",
            f"deepspeed.nvme_dir={tmp_path / 'nvme'}",
            f"deepspeed.config={own}",
            "train.grad_accum=3",
        ],
    )
    ds = deepspeed_config(engine_setup(cfg, DeepSpeedEngine), world=2)
    assert json.loads(json.dumps(ds)) == ds  # plain JSON
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 12345 and ds["communication_data_type"] == "fp32"
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 2 * 3 * 2  # the recipe's
    assert z["offload_param"] == {"device": "nvme", "nvme_path": str(tmp_path / "nvme"), "max_in_cpu": 0}
    assert z["offload_optimizer"]["device"] == "nvme" and z["stage3_max_reuse_distance"] == 0


def _one_process(out, *overrides):
    linear = torch.nn.functional.linear
    launcher = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    assert (
        main(
            [
                "run",
                "full",
                *RUN,
                "train.max_steps=4",
                "engine.name=deepspeed",
                "deepspeed.zero_stage=3",
                "checkpoint.every=2",
                f"output_dir={out}",
                *overrides,
            ]
        )
        == 0
    )
    assert torch.nn.functional.linear is linear  # ZeRO-3's process-wide F.linear patch undone after the run
    # the rank variables DeepSpeed needs are taken back: a later transformers.Trainer is not a torchrun rank
    assert {k: os.environ.get(k) for k in launcher} == launcher
    return losses(out)


def test_zero3_cpu_offload_follows_zero3(tmp_path):
    assert _one_process(tmp_path / "off", "engine.params=cpu", "engine.optimizer=cpu") == _one_process(tmp_path / "on")


def _aio_ok() -> bool:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return AsyncIOBuilder().is_compatible(verbose=False)
    except Exception:  # noqa: BLE001  (no libaio, no compiler)
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _aio_ok(), reason="DeepSpeed's async_io needs libaio-dev (apt-get install libaio-dev)")
def test_zero3_nvme_offload_follows_zero3(tmp_path):
    """Parameters and optimizer state swapped to files (first run JIT-compiles DeepSpeed's async_io op)."""
    nvme = tmp_path / "nvme"
    assert _one_process(
        tmp_path / "off", "engine.params=disk", "engine.optimizer=disk", f"deepspeed.nvme_dir={nvme}"
    ) == _one_process(tmp_path / "on")
    assert any(nvme.rglob("*.swp")) or any(nvme.iterdir())
