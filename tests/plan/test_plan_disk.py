"""`slimtune plan`'s disk figures (plan/disk.py): a real offload run never holds more on disk than the plan says,
nor far less; bf16 master weights halve the master part of the store; --disk refuses in one line."""

import json

import pytest
import torch
from slimtune_testutil import TINY

from slimtune.cli import main
from slimtune.config import load_config
from slimtune.engines.offload import store as S
from slimtune.engines.offload.rundir import bytes_held
from slimtune.hooks import Hooks
from slimtune.plan.estimate import plan_memory
from slimtune.trainer import run


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """2 layers of hidden 256: tensors large against the store's 4 KiB alignment, so its padding is noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.formats.hf import load_tokenizer

    path = tmp_path_factory.mktemp("wide")
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer("tiny-llama").save_pretrained(path)
    return str(path)


class DiskWatch(Hooks):
    def __init__(self, root):
        self.root, self.most = root, 0

    def _look(self):
        self.most = max(self.most, bytes_held(self.root))

    def after_backward(self, model, step):  # the gradients of clipping are in the store now
        self._look()

    def on_save(self, path, step):
        self._look()


@pytest.mark.parametrize("master", ["float32", "bfloat16"])
def test_an_offload_run_holds_no_more_disk_than_planned(wide_model, tmp_path, monkeypatch, master):
    monkeypatch.setattr(S, "CHUNK", 4096)
    out = tmp_path / "run"
    args = [
        f"model.name={wide_model}",
        "model.dtype=float32",
        "train.seq_len=64",
        "train.max_steps=6",
        "train.max_grad_norm=1.0",
        "checkpoint.every=2",
        "checkpoint.keep=2",
        "eval.max_batches=1",
        "logging.progress=false",
        "engine.name=offload",
        f"optim.master_dtype={master}",
        f"output_dir={out}",
    ]
    cfg = load_config("full", args)
    disk = plan_memory(cfg).disk
    watch = DiskWatch(out)
    run(cfg, hooks=[watch])
    watch._look()  # final/ written, the live store gone
    assert 0.5 * disk["total"] <= watch.most <= disk["total"], (watch.most, disk)
    assert disk["final"] <= bytes_held(out / "final") <= 1.05 * disk["final"] + 2**20  # + tokenizer and config


def test_bf16_masters_halve_the_master_part_of_the_store():
    base = [*TINY, "engine.name=offload", "train.max_grad_norm=0", "optim.state_bits=8"]
    fp32 = plan_memory(load_config("full", base)).disk["offload.store"]
    bf16 = plan_memory(load_config("full", [*base, "optim.master_dtype=bfloat16"])).disk["offload.store"]
    n = plan_memory(load_config("full", base)).details["params"]
    assert fp32 - bf16 == 2 * n  # 4 -> 2 bytes per master weight; the 8-bit moments unchanged


def _plan(capfd, *args):
    code = main(["plan", *args])
    out, err = capfd.readouterr()
    return code, out, err


def test_disk_in_table_and_json(capfd):
    code, out, _ = _plan(capfd, "full", *TINY, "engine.name=offload")
    assert code == 0 and "offload.store" in out.splitlines()[-1] and "a resume needs" in out
    code, out, _ = _plan(capfd, "full", *TINY, "--json")
    disk = json.loads(out)["disk_bytes"]
    assert disk["total"] == sum(v for k, v in disk.items() if k != "total") > 0


def test_disk_budget(capfd):
    code, out, _ = _plan(capfd, "full", *TINY, "--disk", "1MB")
    assert code == 0 and out.splitlines()[-1].startswith("the run writes up to")
    code, out, _ = _plan(capfd, "full", *TINY, "--disk", "100GB")
    assert code == 0 and out.splitlines()[-1] == "fits the disk budget of 100.00 GB"
    code, out, err = _plan(capfd, "full", *TINY, "--fit", "8GiB", "--disk", "1MB")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--disk" in err
    code, out, err = _plan(capfd, "full", *TINY, "--disk", "lots")
    assert code == 2 and err.startswith("slimtune: error: --disk 'lots'")


def test_offload_phases_hold_one_unit_not_the_model(wide_model):
    """The streamed load and final/ hold a unit at a time, and the offload engine keeps no autocast copy of a
    weight (the planner once charged a 7B offload run 26 GiB for those; it measured 3.3 GiB)."""
    from slimtune.plan.activations import activations
    from slimtune.plan.arch import architecture
    from slimtune.plan.weights import model_weights

    base = [f"model.name={wide_model}", "model.dtype=bfloat16", "train.seq_len=64", "train.max_steps=2"]
    arch = architecture(wide_model)
    whole = 4 * arch.numel
    off = load_config("full", [*base, "engine.name=offload"])
    plan = plan_memory(off, device="cpu")
    assert plan.phases["load"] < 0.6 * whole + plan.breakdown["libraries"] + plan.breakdown["tokenizer"] + 2**20
    mem = load_config("full", base)
    assert activations(arch, off, model_weights(arch, off), "cpu").weight_copies == 0
    assert activations(arch, mem, model_weights(arch, mem), "cpu").weight_copies > 0  # ddp + autocast: casts saved
    bf16 = load_config("full", [*base, "optim.master_dtype=bfloat16"])
    assert activations(arch, bf16, model_weights(arch, bf16), "cpu").weight_copies == 0  # bf16 masters: no cast
