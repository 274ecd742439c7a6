"""LQ-LoRA / LoftQ / EoRA end to end on the tiny model: quantize CLI, training, save -> load, export."""

import json

import pytest
import torch

from slimtune import config as C
from slimtune.cli import main
from slimtune.trainer.hooks import Hooks

LQ = ["lora.rank=8", "lq_lora.calibration_samples=4", "lq_lora.max_iters=3", "checkpoint.every=0"]


class Grab(Hooks):
    def on_setup(self, model, optimizer, cfg):
        self.model = model


def logits(model, seed=0):
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


@pytest.fixture(scope="module")
def lq_ckpt(tmp_path_factory):
    from slimtune_testutil import TINY

    out = tmp_path_factory.mktemp("q") / "lq"
    assert main(["quantize", "lq_lora", *TINY, *LQ, "lq_lora.budget_bits=3.0", f"output_dir={out}"]) == 0
    return out


def test_quantize_writes_a_checkpoint_within_budget(lq_ckpt, tiny_model_dir):
    from slimtune.model.load import load_base as load_model

    manifest = json.loads((lq_ckpt / "slimtune_quant.json").read_text())
    assert manifest["method"] == "lq_lora" and manifest["budget_bits"] == 3.0
    assert manifest["bits_per_param"] <= 3.0 + 1e-9
    assert manifest["allocation"]["avg_bits"] == pytest.approx(manifest["bits_per_param"], rel=1e-9)
    assert "TOTAL" in (lq_ckpt / "allocation.txt").read_text().upper()
    formats = {spec["format"].split("-")[0] for spec in manifest["quantized"].values()}
    assert formats <= {"nf2", "nf3", "nf4"}
    assert len(manifest["adapters"]) == len(manifest["quantized"]) == 14  # 7 linears x 2 layers
    # the quantized + low-rank model stays close to the full-precision one
    full, lq = logits(load_model(str(tiny_model_dir))), logits(load_model(str(lq_ckpt)))
    assert (lq - full).norm() < 0.5 * full.norm()


def test_lq_lora_training_lowers_loss_and_save_load_is_exact(tmp_path, tiny_overrides, lq_ckpt, capsys):
    grab = Grab()
    out = tmp_path / "run"
    cfg = C.load_config(
        "lq_lora",
        [*tiny_overrides, *LQ, "train.max_steps=8", "train.lr=1e-2", f"model.name={lq_ckpt}", f"output_dir={out}"],
    )
    from slimtune.trainer import run

    report = run(cfg, [grab])
    assert report["final_loss"] < report["initial_loss"]
    assert report["trainable_params"] > 0
    from slimtune.model.load import load_base as load_model

    torch.testing.assert_close(logits(load_model(str(out / "final"))), logits(grab.model), rtol=0, atol=1e-5)
    # `slimtune eval` of the saved run gives the perplexity the run reported
    capsys.readouterr()
    assert main(["eval", *tiny_overrides, f"model.name={out / 'final'}"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_perplexity"]
    assert ppl == pytest.approx(report["eval_perplexity"], rel=1e-4)
    # export --merge: a plain HF model with the same outputs
    assert main(["export", str(out), "--merge"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(logits(merged), logits(grab.model), rtol=1e-4, atol=1e-4)


def test_lq_lora_from_scratch_decomposes_in_the_run(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "lq_lora",
                *tiny_overrides,
                *LQ,
                "train.max_steps=4",
                "train.lr=1e-2",
                "lq_lora.fisher=false",
                "lq_lora.budget_bits=3.5",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["bits_per_param"] <= 3.5
    assert (out / "allocation.txt").is_file()
    assert (out / "final" / "slimtune_quant.json").is_file()


@pytest.mark.parametrize("init", ["loftq", "eora"])
def test_loftq_and_eora_start_closer_to_full_precision(tmp_path, tiny_overrides, tiny_model_dir, init):
    from slimtune.model.load import load_base as load_model

    out = tmp_path / init
    args = [
        *tiny_overrides,
        "quant.method=nf3",
        "quant.double_quant=false",
        "lora.rank=16",
        "lq_lora.calibration_samples=8",
        "train.max_steps=3",
        "train.lr=1e-2",
        "checkpoint.every=0",
    ]
    assert main(["run", "lora", *args, f"adapter.init={init}", f"output_dir={out}"]) == 0
    assert main(["quantize", "lora", *args, f"output_dir={tmp_path / 'plain'}"]) == 0
    assert main(["quantize", "lora", *args, f"adapter.init={init}", f"output_dir={tmp_path / 'init'}"]) == 0
    full = logits(load_model(str(tiny_model_dir)))
    plain, inited = logits(load_model(str(tmp_path / "plain"))), logits(load_model(str(tmp_path / "init")))
    assert (inited - full).norm() < (plain - full).norm()
    report = json.loads((out / "report.json").read_text())
    assert report["final_loss"] < report["initial_loss"]


def test_manifest_that_does_not_match_the_tensors_is_a_clear_error(tmp_path, lq_ckpt, capsys, tiny_overrides):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(lq_ckpt, bad)
    manifest = json.loads((bad / "slimtune_quant.json").read_text())
    name, spec = next(iter(manifest["quantized"].items()))
    spec["format"] = "nf4-b64" if not spec["format"].startswith("nf4") else "nf2-b64"
    (bad / "slimtune_quant.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["eval", *tiny_overrides, f"model.name={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest" in err and "slimtune_quant.json" in err
    (bad / "slimtune_quant.json").write_text("{not json")
    assert main(["eval", *tiny_overrides, f"model.name={bad}"]) == 2
    assert "slimtune_quant.json" in capsys.readouterr().err


def test_bad_lq_lora_config_is_rejected():
    with pytest.raises(C.ConfigError, match="quant.method=lq_lora"):
        C.load_config("lora", ["adapter.type=lq_lora"])
    with pytest.raises(C.ConfigError, match="adapter.init=loftq"):
        C.load_config("lora", ["adapter.init=loftq"])
    with pytest.raises(C.ConfigError, match="budget_bits"):
        C.load_config("lq_lora", ["lq_lora.budget_bits=1.0"])


def test_quantize_bad_input_is_one_line_exit_2(tmp_path, tiny_overrides, lq_ckpt, capsys):
    capsys.readouterr()
    # a budget below the cheapest candidate (nf2, blocks of 256, dq scales: ~2.05 bits/param)
    assert (
        main(["quantize", "lq_lora", *tiny_overrides, *LQ, "lq_lora.budget_bits=2.0", f"output_dir={tmp_path / 'q'}"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0] and "2.0" in err[0], err
    assert not (tmp_path / "q").exists()
    # an existing checkpoint is never overwritten without overwrite=true
    before = (lq_ckpt / "model.safetensors").read_bytes()
    assert main(["quantize", "lq_lora", *tiny_overrides, *LQ, f"output_dir={lq_ckpt}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert (lq_ckpt / "model.safetensors").read_bytes() == before
