"""The Python API (slimtune/api.py) and the two example scripts built on it: the plain loop reproduces
`slimtune run lora`'s first losses, transformers.Trainer reproduces the plain loop's, and what
slimtune.save writes loads in `slimtune eval` and in PEFT."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slimtune
from slimtune.errors import ConfigError
from slimtune_testutil import losses, run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(script: str, cwd: Path, *args: str) -> list[float]:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return [float(v) for v in re.findall(r"^step \d+ loss (\S+)$", r.stdout, re.M)]


@pytest.fixture(scope="module")
def plain_loop(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("plain")
    return cwd, example("plain_loop.py", cwd, "tiny-llama", "5", "float32")


def test_plain_loop_reproduces_slimtune_run(plain_loop, tmp_path):
    _, loop_losses = plain_loop
    out = tmp_path / "run"
    run_cli(
        "-m",
        "slimtune",
        "run",
        "lora",
        "model.name=tiny-llama",
        "model.dtype=float32",
        "eval.max_batches=1",
        "logging.progress=false",
        "checkpoint.every=0",
        f"output_dir={out}",
    )
    assert len(loop_losses) == 5
    assert losses(out)[:5] == pytest.approx(loop_losses, abs=1e-5)


def test_trainer_reproduces_plain_loop(plain_loop, tmp_path):
    _, loop_losses = plain_loop
    trainer_losses = example("hf_trainer.py", tmp_path, "tiny-llama", "3", "float32")
    assert trainer_losses == pytest.approx(loop_losses[:3], abs=1e-5)


def test_saved_adapter_loads_in_eval_and_peft(plain_loop):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.formats.hf import base_dir

    cwd, _ = plain_loop
    final = cwd / "runs" / "plain_loop" / "final"
    r = run_cli("-m", "slimtune", "eval", f"model.name={final}", "model.dtype=float32", "eval.max_batches=1")
    assert "perplexity" in r.stdout.lower()
    base = AutoModelForCausalLM.from_pretrained(base_dir("tiny-llama"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, final)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the trained factors, not the zero init


def test_loss_equals_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    model, tokenizer = slimtune.load("tiny-llama", dtype="float32", loss_chunk_tokens=16)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    labels = ids.clone()
    labels[0, :7] = -100
    logits = model(input_ids=ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert slimtune.loss(model, ids, labels).item() == pytest.approx(want.item(), rel=1e-5)


def test_peft_loads_what_save_writes_with_equal_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.formats.hf import base_dir

    torch.manual_seed(0)
    model, tokenizer = slimtune.load("tiny-llama", dtype="float32")
    slimtune.add_adapter(model, "lora", rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    opt = slimtune.optimizer(model, "adamw", lr=1e-2)
    for ids, labels, pos in slimtune.batches(tokenizer, 2, seq_len=64, batch_size=2):
        slimtune.loss(model, ids, labels, pos).backward()
        opt.step()
        opt.zero_grad()
    slimtune.save(model, tmp_path / "final", tokenizer)
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir("tiny-llama"), dtype=torch.float32), tmp_path / "final"
    )
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_keywords_are_config_keys_and_refusals_are_the_clis():
    model, _ = slimtune.load("tiny-llama", dtype="float32")
    with pytest.raises(ConfigError, match="unknown keyword 'rnak'.*rank"):
        slimtune.add_adapter(model, "lora", rnak=4)
    with pytest.raises(ConfigError, match="lora.rank=0"):
        slimtune.add_adapter(model, "lora", rank=0)
    slimtune.add_adapter(model, "lora", rank=4)
    opt = slimtune.optimizer(model, "galore", lr=1e-3, rank=2, update_gap=5)
    assert isinstance(opt, torch.optim.Optimizer)
    assert model.slimtune_config.galore.rank == 2 and model.slimtune_config.galore.update_gap == 5
    quantized, _ = slimtune.load("tiny-llama", quant="nf4", dtype="float32")
    with pytest.raises(
        ConfigError,
        match="adapter.type=none needs a base whose weights can be trained, which quant.method=nf4 does not give",
    ):
        slimtune.add_adapter(quantized, "none")


def test_run_returns_the_report(tmp_path):
    report = slimtune.run(
        "lora",
        ["logging.progress=false"],
        model={"name": "tiny-llama", "dtype": "float32"},
        train={"max_steps": 2, "seq_len": 64},
        eval={"max_batches": 1},
        output_dir=str(tmp_path / "r"),
    )
    import json

    assert report == json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(losses(tmp_path / "r")) == 2 and report["eval_perplexity"] > 0


def test_trl_sft_trainer_reproduces_plain_loop(plain_loop, tmp_path):
    pytest.importorskip("trl")
    _, loop_losses = plain_loop
    assert example("trl_sft.py", tmp_path, "tiny-llama", "3", "float32") == pytest.approx(loop_losses[:3], abs=1e-5)
