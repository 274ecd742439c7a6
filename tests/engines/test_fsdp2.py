"""engine.name=fsdp2 on 2 processes (gloo): full fine-tuning follows DDP on 2 processes and one process with
grad_accum 2 step for step; LoRA follows DDP and QLoRA trains; a run saved on 2 processes resumes on 1 with the
curve continuing; what FSDP2 cannot shard is one line."""

import json
import shutil

import pytest
import torch

from slimtune.cli import main
from slimtune_testutil import ENGINE_RUN, close_curves, losses, safetensors_dir, torchrun2

RUN = ENGINE_RUN
_torchrun, _close = torchrun2, close_curves


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    _torchrun("full", "engine.name=ddp", f"output_dir={root / 'ddp'}")
    _torchrun("full", "engine.name=fsdp2", "checkpoint.every=3", f"output_dir={root / 'fsdp2'}")
    assert main(["run", "full", *RUN, "train.grad_accum=2", f"output_dir={root / 'one'}"]) == 0
    return root


def test_full_fine_tuning_follows_ddp_and_one_process(full_runs):
    fsdp = losses(full_runs / "fsdp2")
    _close(fsdp, losses(full_runs / "ddp"))
    _close(fsdp, losses(full_runs / "one"))
    a, b = safetensors_dir(full_runs / "fsdp2" / "final"), safetensors_dir(full_runs / "ddp" / "final")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    report = json.loads((full_runs / "fsdp2" / "report.json").read_text())
    assert report["world_size"] == 2 and report["config"]["engine"]["name"] == "fsdp2"


def test_a_run_saved_on_two_processes_resumes_on_one(full_runs, tmp_path):
    """The checkpoint holds full tensors and name-keyed optimizer state (safetensors + JSON): one process
    with grad_accum 2 (the same global batch) continues the 2-process curve from step 3."""
    out = tmp_path / "resumed"
    shutil.copytree(full_runs / "fsdp2", out)
    (out / "final").rename(out / "final.old")
    ckpt = out / "checkpoints" / "step_3"
    assert {p.name for p in ckpt.iterdir()} >= {"trainable.safetensors", "optimizer.safetensors", "optimizer.json"}
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.bin"))
    assert (
        main(["run", "full", *RUN, "engine.name=fsdp2", "train.grad_accum=2", "resume=true", f"output_dir={out}"]) == 0
    )
    _close(losses(out), losses(full_runs / "fsdp2"))
    a, b = safetensors_dir(out / "final"), safetensors_dir(full_runs / "fsdp2" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_lora_follows_ddp_and_qlora_trains(tmp_path):
    _torchrun("lora", "engine.name=fsdp2", f"output_dir={tmp_path / 'lora'}")
    _torchrun("lora", "engine.name=ddp", f"output_dir={tmp_path / 'ddp'}")
    _close(losses(tmp_path / "lora"), losses(tmp_path / "ddp"))
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()
    a = safetensors_dir(tmp_path / "lora" / "final")
    b = safetensors_dir(tmp_path / "ddp" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    _torchrun("qlora", "engine.name=fsdp2", "train.lr=1e-2", f"output_dir={tmp_path / 'qlora'}")
    _torchrun("qlora", "engine.name=ddp", "train.lr=1e-2", f"output_dir={tmp_path / 'qlora_ddp'}")
    curve = losses(tmp_path / "qlora")
    assert curve[-1] < curve[0]
    _close(curve, losses(tmp_path / "qlora_ddp"))


@pytest.mark.parametrize("method", ["nf4", "int8", "nf3", "q4_0"])
def test_quantized_base_becomes_one_shardable_parameter(method):
    """The packed codes / scales become one frozen uint8 Parameter (what FSDP2 shards); the layer computes
    exactly what it did from its buffers."""
    from slimtune.quant import QUANT_FORMATS
    from slimtune.engines.fsdp2 import shardable_quant

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    cls = QUANT_FORMATS.get(method)
    q = cls.quantize_linear(lin, cls.format_for(method, 64, True))
    x = torch.randn(3, 128)
    want, nbytes = q(x), q.nbytes
    wrapper = torch.nn.Sequential(q)
    assert shardable_quant(wrapper) == 1
    assert not list(q.buffers())
    (p,) = [p for n, p in q.named_parameters() if n == "packed_bytes"]
    assert p.dtype == torch.uint8 and not p.requires_grad and p.numel() == nbytes
    assert torch.equal(q(x), want)
    with torch.no_grad():  # a new gathered tensor (what FSDP2's unshard swaps in) is re-viewed at forward
        q.packed_bytes = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    assert torch.equal(q(x), want)


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            ["engine.name=fsdp2", "optim.name=galore"],
            "optim.name=galore needs each rank to hold whole parameter matrices, which engine.name=fsdp2 does not give",
        ),
        (
            ["engine.name=fsdp2", "optim.state_bits=8"],
            "optim.state_bits=8 needs each rank to hold whole parameter "
            "matrices, which engine.name=fsdp2 does not give",
        ),
        (
            ["engine.name=fsdp2", "engine.optimizer=disk"],
            "this engine keeps optimizer in memory; use engine.name=offload",
        ),
        (
            ["engine.name=deepspeed", "engine.optimizer=disk", "deepspeed.zero_stage=1"],
            "engine.optimizer=disk needs deepspeed.zero_stage>=2",
        ),
        (["engine.name=deepspeed", "deepspeed.config=/nonexistent/ds.json"], "no such file"),
    ],
)
def test_what_an_engine_cannot_do_is_one_line(override, needle, tmp_path, capsys):
    assert main(["run", "full", *RUN, *override, f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
