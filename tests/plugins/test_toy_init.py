"""A toy adapter initialisation added by this file alone: LoRA's A starts at the top right singular vectors of
the base weight (B at 0, so the model is unchanged at step 0). Its rule, its flags (plain LoRA factors),
planned, set up as each module is wrapped, and trained."""

import pytest
import torch

import slimtune
from slimtune import config as C
from slimtune.errors import ConfigError
from slimtune.plan import plan_memory
from slimtune.registry import ADAPTER_INITS
from slimtune.technique import declares
from slimtune.trainer import run
from slimtune_testutil import TINY, losses


def _validate(cfg):
    if cfg.quant.method != "none":
        raise ConfigError(
            f"adapter.init=toy_orth starts from a full-precision base; quant.method="
            f"{cfg.quant.method} is not one: set quant.method=none"
        )


@torch.no_grad()
def orth_init_(m, options, name=None):
    """As `m` (a LoRALinear) is wrapped: A = the top-r right singular vectors of its weight, B = 0."""
    _, _, Vh = torch.linalg.svd(m.base.weight.detach().float(), full_matrices=False)
    m.lora_A.weight.copy_(Vh[: m.rank])
    m.lora_B.weight.zero_()


@declares(requires={"plain_lora"}, validate=_validate)
def apply_orth(model, setup, calibration=None, compute_dtype=torch.float32, log=print):
    raise AssertionError("only a quantized base calls this; the rule refuses one")


apply_orth.wrap = orth_init_


@pytest.fixture(autouse=True)
def toy(plug):
    plug(ADAPTER_INITS, "toy_orth", apply_orth)


def test_selectable_and_validated():
    assert C.load_config("lora", [*TINY, "adapter.init=toy_orth"]).adapter.init == "toy_orth"
    with pytest.raises(
        ConfigError,
        match="adapter.init=toy_orth needs plain LoRA factors .adapter.type=lora., "
        "which adapter.type=dora does not give",
    ):
        C.load_config("lora", [*TINY, "adapter.init=toy_orth", "adapter.type=dora"])
    with pytest.raises(ConfigError, match="quant.method=nf4 is not one: set quant.method=none"):
        C.load_config("qlora", [*TINY, "adapter.init=toy_orth"])


def test_planned_as_lora():
    plain = plan_memory(C.load_config("lora", TINY), device="cpu")
    assert plan_memory(C.load_config("lora", [*TINY, "adapter.init=toy_orth"]), device="cpu") == plain


def test_factors_are_the_singular_vectors():
    model, _ = slimtune.load("tiny-llama", dtype="float32")
    q = model.model.layers[0].self_attn.q_proj
    want = torch.linalg.svd(q.weight.detach().float(), full_matrices=False)[2][:4]
    slimtune.add_adapter(model, "lora", rank=4, init="toy_orth")
    lora = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(lora.lora_A.weight, want)
    assert torch.count_nonzero(lora.lora_B.weight) == 0


def test_trains_from_the_unchanged_model(tmp_path):
    common = [*TINY, "train.max_steps=6", "checkpoint.every=0"]
    run(C.load_config("lora", [*common, f"output_dir={tmp_path / 'default'}"]))
    run(C.load_config("lora", [*common, "adapter.init=toy_orth", f"output_dir={tmp_path / 'orth'}"]))
    default, orth = losses(tmp_path / "default"), losses(tmp_path / "orth")
    assert orth[0] == pytest.approx(default[0], abs=1e-6)  # B = 0: the base model's loss
    assert orth[-1] < orth[0] and orth != default
