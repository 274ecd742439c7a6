"""train.precision=fp8|halo|mxfp4 on the tiny model: the loss falls and stays within a stated tolerance
of the bf16 run, for full fine-tuning and for LoRA's base path."""

import json

import pytest

from slimtune.cli import main

STEPS = 30
# Final-loss tolerance vs the bf16 run after 30 steps (measured gaps: fp8/halo < 0.1%, mxfp4 < 0.5%).
TOLERANCE = {"fp8": 0.01, "halo": 0.01, "mxfp4": 0.03}


def _run(tmp_path, tiny_overrides, recipe, name, *extra):
    out = tmp_path / name
    args = [*tiny_overrides, f"train.max_steps={STEPS}", "train.lr=3e-3", *extra, f"output_dir={out}"]
    assert main(["run", recipe, *args]) == 0
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory):
    from slimtune_testutil import TINY

    tmp = tmp_path_factory.mktemp("bf16")
    return {r: _run(tmp, list(TINY), r, r, "model.dtype=bfloat16")[0] for r in ("full", "lora")}


@pytest.mark.parametrize(
    "recipe, precision, extra",
    [
        ("full", "fp8", ()),
        ("full", "halo", ("halo.level=2", "halo.hadamard_block=32")),
        ("full", "halo", ("halo.level=1",)),
        ("full", "mxfp4", ()),
        ("lora", "fp8", ()),
        ("lora", "halo", ()),
        ("lora", "mxfp4", ()),
        ("full", "halo", ("model.dtype=bfloat16",)),  # under bf16 autocast
        ("full", "mxfp4", ("train.activation_checkpointing=true",)),  # forward recomputed in backward
    ],
)
def test_low_precision_training_tracks_bf16(tmp_path, tiny_overrides, bf16_losses, recipe, precision, extra):
    losses, report = _run(tmp_path, tiny_overrides, recipe, "run", f"train.precision={precision}", *extra)
    # tiny-llama: 2 layers x 7 linears (q, k, v, o, gate, up, down); the head stays full precision
    assert report["low_precision_linears"] == 14
    assert losses[-1] < losses[0] - 0.05
    ref = bf16_losses[recipe][-1]
    assert abs(losses[-1] - ref) < TOLERANCE[precision] * ref, (losses[-1], ref)


def test_precision_stage_swaps_lora_bases_not_factors_nor_head():
    """The pipeline applies train.precision after the adapters: the wrapped bases compute in low precision,
    LoRA's own factors and the output head (even LoRA-wrapped) stay full precision."""
    import torch.nn as nn

    from slimtune.adapters import adapter_internals, adapter_modules, apply_adapters
    from slimtune.adapters.lora import LoRAConfig
    from slimtune.config import AdapterConfig
    from slimtune.formats.hf import load_model
    from slimtune.precision.fp8 import FP8Linear
    from slimtune.precision.swap import apply_precision

    model = load_model("tiny-llama")
    apply_adapters(model, AdapterConfig(target_modules=("q_proj", "lm_head")), LoRAConfig(rank=4))
    n = apply_precision(model, "fp8", skip=adapter_internals(model))
    adapters = adapter_modules(model)
    assert n == 2 * 7  # every decoder linear (2 layers x 7, the two q_proj bases included), not the head
    for name, m in adapters.items():
        assert type(m.lora_A) is nn.Linear and type(m.lora_B) is nn.Linear
        assert isinstance(m.base, FP8Linear) != name.endswith("lm_head")
