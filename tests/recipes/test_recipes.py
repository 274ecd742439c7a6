"""Every recipes/*.yaml runs end to end on the tiny model for a few CPU steps and lowers the loss."""

import json

import pytest

from slimtune import config as C
from slimtune.cli import main

# per-recipe lr for a random tiny model (the recipes' own lrs suit SmolLM2)
LR = {"full": "3e-3", "qat": "3e-3", "lora": "1e-2", "qlora": "1e-2", "recover": "3e-3", "sparse_ft": "5e-2"}
REPORT_KEYS = {
    "initial_loss",
    "final_loss",
    "eval_perplexity",
    "eval_perplexity_before",
    "peak_memory_bytes",
    "peak_memory_kind",
    "trainable_params",
    "total_params",
    "tokens_per_second",
    "steps",
    "wall_seconds",
    "config",
}


@pytest.mark.parametrize("recipe", C.list_recipes())
def test_recipe_lowers_loss(recipe, tmp_path, tiny_overrides):
    out = tmp_path / recipe
    extra = []
    if recipe == "recover":  # recovers a pruned model: train the tiny one a little (a teacher worth copying), prune it
        assert (
            main(
                [
                    "run",
                    "full",
                    *tiny_overrides,
                    "train.max_steps=30",
                    "train.lr=3e-3",
                    f"output_dir={tmp_path / 'dense'}",
                ]
            )
            == 0
        )
        # 80% by magnitude: a tiny model loses little at 50%, and recovery needs something to recover
        assert (
            main(
                [
                    "prune",
                    *tiny_overrides,
                    f"model.name={tmp_path / 'dense' / 'final'}",
                    "prune.method=magnitude",
                    "prune.sparsity=0.8",
                    f"output_dir={tmp_path / 'pruned'}",
                ]
            )
            == 0
        )
        extra = [f"model.name={tmp_path / 'pruned'}"]
    rc = main(
        [
            "run",
            recipe,
            *tiny_overrides,
            *extra,
            "train.max_steps=12",
            f"train.lr={LR.get(recipe, '1e-2')}",
            "checkpoint.every=6",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens", "seconds"} <= set(r) for r in rows)
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.05, [r["loss"] for r in rows]
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["eval_perplexity"] < report["eval_perplexity_before"]
    assert report["peak_memory_kind"] == "cpu_peak_rss" and report["peak_memory_bytes"] > 0
    assert 0 < report["trainable_params"] <= report["total_params"]
    assert report["config"]["output_dir"] == str(out)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "step_6" / "COMPLETE").is_file()
    final = out / "final"
    expected = {"none": "config.json", "lq_lora": "slimtune_quant.json", "sparse_ft": "sparse_ft.safetensors"}.get(
        report["config"]["adapter"]["type"], "adapter_config.json"
    )
    if report["config"]["qat"]["method"] != "none":  # QAT: the converted quantized checkpoint, adapter merged
        expected = "slimtune_quant.json"
    assert (final / expected).is_file()


@pytest.mark.parametrize(
    "extra",
    [
        ["quant.backend=bitsandbytes"],
        ["quant.method=int8"],
        ["train.grad_accum=2", "train.activation_checkpointing=true"],
    ],
)
def test_qlora_variants_train(extra, tmp_path, tiny_overrides):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    assert (
        main(["run", "qlora", *tiny_overrides, "train.max_steps=12", "train.lr=1e-2", *extra, f"output_dir={out}"]) == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3]) - 0.15


def test_wandb_offline_logging(tmp_path, tiny_overrides, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "w"
    assert main(["run", "lora", *tiny_overrides, "train.max_steps=3", "logging.wandb=true", f"output_dir={out}"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
