"""A toy checkpoint format added by this file alone: a model dir with every tensor in fp16 in one
`weights.safetensors` (a name transformers does not read) and a `toy_model.json` manifest holding its
checksum. Registered as a kind of model.name (registry.BASES, with `detect` and `load`): `model.name=DIR`
then loads through it in a run, in `slimtune eval` and in the planner; a tampered file is refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune import config as C
from slimtune.errors import SlimtuneError
from slimtune.formats.hf import load_model, load_tokenizer
from slimtune.io import atomic_dir, file_checksum, write_json
from slimtune.plan import plan_memory
from slimtune.registry import BASES
from slimtune.technique import Technique
from slimtune.trainer import run
from slimtune.trainer.evaluate import evaluate_model
from slimtune_testutil import TINY, losses

MANIFEST, WEIGHTS = "toy_model.json", "weights.safetensors"


def save_toy(model, tokenizer, out: Path) -> Path:
    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_word_embeddings
    }
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS))
        write_json(tmp / MANIFEST, {"format": "toy_fp16", "checksum": file_checksum(tmp / WEIGHTS)})
    return out


class ToyFP16Dir(Technique):
    """model.name is a toy fp16 dir."""

    @staticmethod
    def detect(name) -> bool:
        return (Path(name).expanduser() / MANIFEST).is_file()

    @staticmethod
    def load(path: Path, dtype: torch.dtype, keep_compressed: bool = False):
        manifest = json.loads((path / MANIFEST).read_text())
        if file_checksum(path / WEIGHTS) != manifest["checksum"]:
            raise SlimtuneError(
                f"{path / WEIGHTS}: does not match the checksum in {MANIFEST}; the file is "
                "corrupted or was changed: write the model again"
            )
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path / WEIGHTS)).items()}, strict=False)
        model.tie_weights()
        model.config.use_cache = False
        return model.requires_grad_(False)


@pytest.fixture(autouse=True)
def toy(plug):
    plug(BASES, "toy fp16 dir", ToyFP16Dir)


@pytest.fixture
def toy_dir(tmp_path):
    return save_toy(load_model("tiny-llama", "float32"), load_tokenizer("tiny-llama"), tmp_path / "toy")


def test_loads_as_written_and_refuses_a_tampered_file(toy_dir):
    reference = evaluate_model(C.load_config(None, [*TINY, "model.name=tiny-llama"]))
    loaded = evaluate_model(C.load_config(None, [*TINY, f"model.name={toy_dir}"]))
    assert loaded["eval_perplexity"] == pytest.approx(reference["eval_perplexity"], rel=1e-3)  # fp16 weights
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(toy_dir)  # not a format transformers reads: the registry loaded it
    raw = bytearray((toy_dir / WEIGHTS).read_bytes())
    raw[-1] ^= 1
    (toy_dir / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(SlimtuneError, match="weights.safetensors: does not match the checksum"):
        evaluate_model(C.load_config(None, [*TINY, f"model.name={toy_dir}"]))


def test_planned_and_trained(toy_dir, tmp_path):
    cfg = C.load_config("lora", [*TINY, f"model.name={toy_dir}", "train.max_steps=6", f"output_dir={tmp_path / 'run'}"])
    assert plan_memory(cfg, device="cpu").details["model"] == str(toy_dir.resolve())
    report = run(cfg)
    assert len(losses(tmp_path / "run")) == 6 and report["eval_perplexity"] < report["eval_perplexity_before"]
    scored = evaluate_model(C.load_config(None, [*TINY, f"model.name={tmp_path / 'run' / 'final'}"]))
    assert scored["eval_perplexity"] == pytest.approx(report["eval_perplexity"], rel=1e-5)
