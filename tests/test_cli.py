"""Bad input from the command line: one line on stderr naming the key/file, exit code 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch


def slimtune(*args):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "slimtune", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "lora", "train.max_stepz=3"], "did you mean 'train.max_steps'"),
        (["run", "lora", "lora.rank=two"], "lora.rank: expected int"),
        (["run", "lroa"], "unknown recipe 'lroa'; did you mean 'lora'"),
        (["run", "missing.yaml"], "recipe file 'missing.yaml' not found"),
        (["run", "lora", "model.name=/no/such/model"], "model.name='/no/such/model': no config.json"),
        (
            ["run", "lora", "model.name=tiny-llama", "train.seq_len=4096"],
            "train.seq_len=4096 exceeds the model's context of 1024",
        ),
        (
            ["run", "lora", "model.name=tiny-llama", "train.seq_len=32", "data.source=/no/file.txt"],
            "data.source='/no/file.txt': file not found",
        ),
        (["run", "lora", "model.name=tiny-llama", "train.seq_len=32", "lora.rank=999"], "lora.rank=999"),
        (["export", "/no/run"], "not a finished slimtune run"),
        (["export", "/no/run", "--format", "zip"], "export --format 'zip': use one of hf, dfloat11"),
        (["export", "/no/model", "--format", "dfloat11"], "/no/model"),
        (["export", "/no/run", "--merge"], "not a finished slimtune run"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = slimtune(*args, f"output_dir={tmp_path / 'out'}") if args[0] == "run" else slimtune(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # bad input writes nothing


def test_recipes_and_config_show():
    r = slimtune("recipes")
    assert r.returncode == 0 and {"lora", "qlora", "full"} <= set(r.stdout.split())
    r = slimtune("config", "show", "qlora", "lora.rank=8")
    assert r.returncode == 0 and "rank: 8" in r.stdout and "method: nf4" in r.stdout


def test_export_merge_and_eval(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    r = slimtune("run", "lora", *tiny_overrides, "train.max_steps=4", "train.lr=1e-2", f"output_dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = slimtune("export", str(run_dir), "--merge")
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    from slimtune.formats.peft import load_peft_adapter
    from slimtune.formats.hf import load_model

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    adapted = load_model("tiny-llama").eval()
    load_peft_adapter(adapted, run_dir / "final")
    x = torch.randint(0, 500, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted(input_ids=x).logits, rtol=1e-4, atol=1e-4)

    # `slimtune eval` on the adapter dir reproduces the run's final eval perplexity
    r = slimtune("eval", *tiny_overrides, f"model.name={run_dir / 'final'}")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["eval_perplexity"]
    want = json.loads((run_dir / "report.json").read_text())["eval_perplexity"]
    assert abs(got - want) < 1e-3 * want


def _no_tokenizer_model(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "model_without_tokenizer"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / f, d / f)
    return d


@pytest.mark.parametrize("case", ["betas", "kernels_env", "not_utf8", "no_tokenizer", "adapter_no_base"])
def test_input_errors_never_show_a_traceback(case, tmp_path, tiny_model_dir):
    """Each expected input error is one line naming the key / variable / file and the fix, exit 2."""
    common = [
        "model.name=tiny-llama",
        "train.seq_len=32",
        "train.max_steps=1",
        "logging.progress=false",
        f"output_dir={tmp_path / 'out'}",
    ]
    env = {}
    if case == "betas":
        args, needle = ["run", "lora", *common, "optim.betas=[0.9,abc]"], "optim.betas[1]: expected float"
    elif case == "kernels_env":
        args, needle, env = ["run", "lora", *common], "SLIMTUNE_KERNELS='fastest'", {"SLIMTUNE_KERNELS": "fastest"}
    elif case == "not_utf8":
        bad = tmp_path / "latin1.jsonl"
        bad.write_bytes('{"text": "café"}\n'.encode("latin-1"))
        args, needle = ["run", "lora", *common, f"data.source={bad}"], f"{bad}:1: not UTF-8"
    elif case == "no_tokenizer":
        d = _no_tokenizer_model(tmp_path, tiny_model_dir)
        args, needle = ["run", "lora", *common, f"model.name={d}"], f"no usable tokenizer files in {d}"
    else:
        a = tmp_path / "adapter"
        a.mkdir()
        (a / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
        args, needle = ["eval", f"model.name={a}", "train.seq_len=32"], "base_model_name_or_path"
    r = subprocess.run(
        [sys.executable, "-m", "slimtune", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", **env},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert needle in lines[-1] and lines[-1].startswith("slimtune: error:"), r.stderr
    assert len(lines) <= 3, r.stderr  # the error, and at most a couple of warning lines before it
    assert not (tmp_path / "out").exists()
