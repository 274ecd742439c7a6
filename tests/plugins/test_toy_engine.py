"""A toy engine added by this file alone: contiguous gradients (DeepSpeed's contiguous_gradients), every
gradient a view into one preallocated fp32 bucket, each start aligned to toy_bucket.align elements. Its
section, its rule, its memory term (the bucket) and training equal to the in-memory engine's."""

from dataclasses import dataclass

import pytest
import torch

from slimtune import config as C
from slimtune.engines.ddp import Engine
from slimtune.errors import ConfigError
from slimtune.hooks import Hooks
from slimtune.plan import plan_memory
from slimtune.registry import ENGINES, SECTIONS
from slimtune.schema import option
from slimtune.trainer import run
from slimtune_testutil import TINY, losses


@dataclass(frozen=True)
class ToyBucketConfig:
    align: int = option("each gradient starts at a multiple of this many elements (a power of two)", 1)


ToyBucketConfig.fixed_on_resume = False


def aligned(n: int, align: int) -> int:
    return -(-n // align) * align


class BucketEngine(Engine):
    section = "toy_bucket"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        a = cfg.toy_bucket.align
        if a <= 0 or a & (a - 1):
            raise ConfigError(f"toy_bucket.align={a} must be a power of two")

    @classmethod
    def memory_terms(cls, cfg, model, s, world, device):
        s.engine, s.grads = s.grads, 0  # the gradients live in the bucket, allocated once
        return s

    def make_optimizer(self):
        optimizer = super().make_optimizer()
        params = [p for _, p in self.trainable()]
        align = self.options.align  # the engine's own section, toy_bucket.*
        self.bucket = torch.zeros(sum(aligned(p.numel(), align) for p in params), device=self.device)
        start = 0
        for p in params:
            p.grad = self.bucket[start : start + p.numel()].view_as(p)
            start += aligned(p.numel(), align)
        return optimizer

    def step(self) -> None:
        self.optimizer.step()
        self.bucket.zero_()  # the views stay: backward accumulates into them in place


class GradsInBucket(Hooks):
    def __init__(self):
        self.checked = 0

    def after_backward(self, model, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        base = grads[0].untyped_storage().data_ptr()
        assert all(g.untyped_storage().data_ptr() == base for g in grads)  # one storage: the bucket
        self.checked += 1


@pytest.fixture(autouse=True)
def toy(plug):
    plug(SECTIONS, "toy_bucket", ToyBucketConfig)
    plug(ENGINES, "toy_bucket", BucketEngine)


def test_selectable_and_validated():
    assert C.load_config("lora", [*TINY, "engine.name=toy_bucket", "toy_bucket.align=8"]).toy_bucket.align == 8
    with pytest.raises(ConfigError, match="toy_bucket.align=3 must be a power of two"):
        C.load_config("lora", [*TINY, "engine.name=toy_bucket", "toy_bucket.align=3"])
    with pytest.raises(ConfigError, match="engine.params=disk with engine.name=toy_bucket"):
        C.load_config("lora", [*TINY, "engine.name=toy_bucket", "engine.params=disk"])


def test_planned_bucket_is_its_declared_term():
    plan = plan_memory(C.load_config("lora", [*TINY, "engine.name=toy_bucket"]), device="cpu")
    assert plan.breakdown["engine.buffers"] == 4 * plan.details["trainable_params"]


def test_trains_as_the_in_memory_engine(tmp_path):
    common = [*TINY, "train.max_steps=4", "train.grad_accum=2", "checkpoint.every=0"]
    run(C.load_config("lora", [*common, f"output_dir={tmp_path / 'ddp'}"]))
    hook = GradsInBucket()
    run(
        C.load_config(
            "lora", [*common, "engine.name=toy_bucket", "toy_bucket.align=64", f"output_dir={tmp_path / 'bucket'}"]
        ),
        hooks=[hook],
    )
    assert hook.checked == 4
    assert losses(tmp_path / "bucket") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-6)
