"""Offloaded training equals in-memory training bit for bit on CPU fp32: the same losses step for step and
the same final weights, for AdamW (with and without clipping, with grad_accum and batch > 1), 8-bit states,
bf16 master weights (stochastic rounding, Kahan), GaLore, and LoRA on a streamed base; on tiny-llama (tied
head, 2 layers: everything fits the slabs) and on
a 6-layer untied model at offload.prefetch=1 (layers leave memory after their forward and are loaded again
by backward's recompute). The store's chunks are made small so parameters stream in several pieces."""

import pytest
import torch
from slimtune_testutil import losses as _losses
from slimtune_testutil import safetensors_dir as _weights
from slimtune_testutil import OFFLOAD_BASE
from slimtune_testutil import run_cli as _cli

from slimtune.config import load_config
from slimtune.trainer import run

BASE = OFFLOAD_BASE
DISK = ["engine.name=offload"]
pytestmark = pytest.mark.usefixtures("small_chunks")


CASES = {
    "adamw": ("full", ["train.max_grad_norm=0", "train.batch_size=4"]),
    "adamw_clip_accum": ("full", ["train.max_grad_norm=0.5", "train.batch_size=2", "train.grad_accum=2"]),
    "adamw_accum": ("full", ["train.max_grad_norm=0", "train.batch_size=3", "train.grad_accum=2"]),
    # bf16 autocast: keep saves references to the weights' casts (no autocast cache in the offload engine)
    "adamw_bf16": ("full", ["model.dtype=bfloat16", "train.max_grad_norm=0.5", "train.batch_size=2"]),
    "adamw_8bit": ("full", ["optim.state_bits=8", "train.max_grad_norm=1.0", "train.batch_size=4"]),
    # bf16 master weights: stochastic rounding's random streams and Kahan's buffer go through the chunks
    "bf16_master_stochastic_8bit": (
        "full",
        ["optim.master_dtype=bfloat16", "optim.state_bits=8", "train.max_grad_norm=0", "train.batch_size=4"],
    ),
    "bf16_master_kahan_clip_accum": (
        "full",
        ["optim.master_dtype=bfloat16", "optim.compensation=kahan", "train.max_grad_norm=0.5", "train.grad_accum=2"],
    ),
    "galore": ("galore", ["galore.rank=8", "galore.update_gap=4", "train.batch_size=4"]),
    "lora_streamed_base": ("lora", ["train.batch_size=4", "lora.rank=4"]),
    "qlora_streamed_nf4_base": ("qlora", ["train.batch_size=4", "lora.rank=4"]),
    "lora_streamed_nf3_base": (
        "lora",
        ["train.batch_size=4", "lora.rank=4", "quant.method=nf3", "quant.block_size=32"],
    ),
    # QAT: each streamed layer's weights fake-quantized in forward (and in backward's recompute); final/ is
    # the quantized checkpoint, converted unit by unit
    "qat_nf3_start_step": (
        "qat",
        ["train.batch_size=4", "qat.method=nf3", "quant.block_size=32", "qat.start_step=3", "train.max_grad_norm=0.5"],
    ),
    "qat_lora_int3_streamed_base": ("qat_lora", ["train.batch_size=4", "lora.rank=4", "qat.method=int3"]),
}


@pytest.mark.parametrize("activations", ["keep", "recompute"])
@pytest.mark.parametrize("model", ["tiny-llama", "deep"])
@pytest.mark.parametrize("case", list(CASES))
def test_offload_equals_in_memory_bitwise(case, model, activations, tmp_path, request):
    recipe, extra = CASES[case]
    quantized = recipe == "qlora" or any(e.startswith(("quant.method", "qat.method")) for e in extra)
    if quantized and activations == "keep":
        pytest.skip("a quantized streamed base recomputes (keep is refused: see test_bad_offload_settings)")
    disk = ["engine.name=offload", "engine.optimizer=none"] if "lora" in recipe else DISK
    disk = [*disk, f"offload.activations={activations}"]
    if model == "deep":
        extra = [*extra, f"model.name={request.getfixturevalue('deep_tiny')}", "train.max_steps=6"]
        disk = [*disk, "offload.prefetch=1"]
    ref = run(load_config(recipe, [*BASE, *extra, f"output_dir={tmp_path / 'mem'}"]))
    off = run(load_config(recipe, [*BASE, *extra, *disk, f"output_dir={tmp_path / 'off'}"]))
    assert _losses(tmp_path / "off") == _losses(tmp_path / "mem")
    assert off["eval_perplexity"] == ref["eval_perplexity"]
    a, b = _weights(tmp_path / "mem" / "final"), _weights(tmp_path / "off" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert off["offload"]["bytes_read"] > 0 and off["offload"]["bytes_written"] > 0
    assert off["offload"]["activations"] == activations
    # keep: backward read streamed weights through references, not through copies autograd held
    assert (off["offload"]["weights_reloaded_for_backward"] > 0) == (activations == "keep")
    assert not (tmp_path / "off" / "offload" / "live").exists()  # the finished run's live store is gone


def test_qat_learned_scales_with_weights_in_memory_equals_in_memory_engine(tmp_path):
    """qat.learn_scales (the scales are parameters of each layer's unit) and int8 activations, with the weights
    in memory (engine.params=none: their scales start from them) and the optimizer state on disk, activations
    kept: the in-memory engine's losses, evaluation and quantized final/ bit for bit."""
    extra = ["train.batch_size=4", "qat.method=int3a", "quant.block_size=32", "qat.learn_scales=true"]
    extra += ["qat.activations=int8", "train.max_grad_norm=0.5"]
    disk = ["engine.name=offload", "engine.params=none", "engine.optimizer=disk", "offload.activations=keep"]
    ref = run(load_config("qat", [*BASE, *extra, f"output_dir={tmp_path / 'mem'}"]))
    off = run(load_config("qat", [*BASE, *extra, *disk, f"output_dir={tmp_path / 'off'}"]))
    assert _losses(tmp_path / "off") == _losses(tmp_path / "mem")
    assert off["eval_perplexity"] == ref["eval_perplexity"]
    a, b = _weights(tmp_path / "mem" / "final"), _weights(tmp_path / "off" / "final")
    assert any(k.endswith("qweight") or "scale" in k for k in a)  # a quantized checkpoint
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_under_bf16_autocast_holds_no_weight_casts(deep_tiny, tmp_path):
    """Under bf16 autocast `mm` saves a view of the weight's bf16 cast (a copy); keep must save a reference
    to it like the fp32 weight itself, or every layer's cast stays in RAM until backward: the same number
    of weights is read back for backward in bf16 as in fp32."""
    args = [
        *BASE,
        "train.max_grad_norm=0",
        "train.batch_size=2",
        f"model.name={deep_tiny}",
        "train.max_steps=2",
        *DISK,
        "offload.activations=keep",
        "offload.prefetch=1",
    ]
    counts = {}
    for dtype in ("float32", "bfloat16"):
        r = run(load_config("full", [*args, f"model.dtype={dtype}", f"output_dir={tmp_path / dtype}"]))
        counts[dtype] = r["offload"]["weights_reloaded_for_backward"]
    assert counts["bfloat16"] == counts["float32"] > 0, counts


KILLER = """
import os, signal, sys
from slimtune.config import load_config
from slimtune.trainer import run
from slimtune.trainer.hooks import Hooks

class KillMidStep(Hooks):
    def after_backward(self, model, step):
        if step == 5:  # step 6's units are already updated in the live store, no checkpoint has them
            os.kill(os.getpid(), signal.SIGKILL)

run(load_config("full", sys.argv[1:]), hooks=[KillMidStep()])
"""


@pytest.mark.parametrize(
    "master",
    [
        [],
        ["optim.master_dtype=bfloat16", "optim.compensation=kahan"],
        ["qat.method=nf3", "quant.block_size=32", "qat.start_step=5"],  # killed before QAT switches on
    ],
    ids=["fp32", "bf16", "qat"],
)
def test_kill_mid_step_then_resume_gives_the_same_losses(tmp_path, master):
    args = [*BASE, *DISK, "train.max_grad_norm=0", "train.batch_size=4", "checkpoint.every=2", "checkpoint.keep=2"]
    args += master  # bf16 masters: Kahan's buffer goes through the snapshot
    ref = tmp_path / "ref"
    _cli("-m", "slimtune", "run", "full", *args, f"output_dir={ref}")
    b = tmp_path / "b"
    killed = _cli("-c", KILLER, *args, f"output_dir={b}", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert sorted(p.name for p in (b / "offload" / "snapshots").iterdir()) == ["step_2", "step_4"]
    _cli("-m", "slimtune", "run", "full", *args, f"output_dir={b}", "resume=true")
    assert _losses(b) == _losses(ref) and len(_losses(b)) == 10
    got, want = _weights(b / "final"), _weights(ref / "final")
    assert want and got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # bitwise the uninterrupted run's values


@pytest.mark.parametrize(
    "case, activations",
    [
        ("adamw_clip_accum", "keep"),
        ("adamw_8bit", "recompute"),
        ("galore", "keep"),
        ("lora_streamed_base", "keep"),
        ("qlora_streamed_nf4_base", "recompute"),
    ],
)
def test_accelerator_path_staged_on_cpu_equals_in_memory(case, activations, tmp_path, request, monkeypatch):
    """The CUDA path's split, run on CPU: units computed on copies uploaded into separate "device" buffers,
    gradients downloaded, updates on the host masters (resident ones copied back), placeholders and
    reductions as on a GPU. Bitwise the in-memory run, on the 6-layer model where layers come and go.
    DeviceMirror takes its synchronous non-CUDA branch here: no copy stream, no events, no pinned memory are
    exercised (test_cuda_path_* below does that, on a GPU)."""
    from slimtune.engines.offload.engine import OffloadEngine

    recipe, extra = CASES[case]
    disk = ["engine.name=offload", "engine.optimizer=none"] if recipe in ("lora", "qlora") else DISK
    extra = [*extra, f"model.name={request.getfixturevalue('deep_tiny')}", "train.max_steps=5"]
    ref = run(load_config(recipe, [*BASE, *extra, f"output_dir={tmp_path / 'mem'}"]))
    monkeypatch.setattr(OffloadEngine, "stage_on_cpu", True)
    off = run(
        load_config(
            recipe,
            [
                *BASE,
                *extra,
                *disk,
                "offload.prefetch=1",
                f"offload.activations={activations}",
                f"output_dir={tmp_path / 'off'}",
            ],
        )
    )
    assert _losses(tmp_path / "off") == _losses(tmp_path / "mem")
    assert off["eval_perplexity"] == ref["eval_perplexity"]
    a, b = _weights(tmp_path / "mem" / "final"), _weights(tmp_path / "off" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert off["offload"]["device_buffer_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_streams_events_pinned_slabs_and_equals_in_memory(deep_tiny, tmp_path):
    """What the staged test cannot reach: pool slabs pinned in place (cudaHostRegister, unregistered by
    close), a unit uploaded into a device buffer on the copy stream with the compute stream waiting on its
    event, gradients downloaded into pinned memory, a released buffer reused after the compute that read it;
    then a tiny offloaded run on cuda (6 layers, prefetch 1: buffers come and go) against the in-memory run on
    cuda: the first loss bitwise (the compute copies equal the masters), then close, as the host's AdamW may
    round differently from the CUDA kernels."""
    from slimtune.engines.offload.device import DeviceMirror, pin, synchronize
    from slimtune.engines.offload.pool import BufferPool

    pool = BufferPool({"layer": (1 << 16, 1)}, pin=pin)
    slab = pool.acquire("layer")
    assert slab.data.is_pinned()
    host = {"w": slab.view(0, torch.float32, (64, 64)), "b": slab.view(64 * 64 * 4, torch.float32, (64,))}
    for t in host.values():
        t.copy_(torch.randn(t.shape))
    mirror = DeviceMirror(torch.device("cuda"), {"layer": (1 << 16, 1)})
    buf, views, uploaded = mirror.upload("layer", host)
    assert uploaded is not None and all(v.is_cuda for v in views.values())
    mirror.wait(uploaded)
    grads, ready = mirror.download({n: v * 2 for n, v in views.items()})
    synchronize(ready)
    assert all(grads[n].is_pinned() and torch.equal(grads[n], host[n] * 2) for n in host)
    mirror.release("layer", buf)
    buf2, views2, uploaded2 = mirror.upload("layer", {n: torch.zeros_like(t) for n, t in host.items()})
    assert buf2.data_ptr() == buf.data_ptr()  # the one buffer, reused once the compute above is done
    mirror.wait(uploaded2)
    assert all(int(torch.count_nonzero(v)) == 0 for v in views2.values())
    mirror.release("layer", buf2)
    pool.release(slab)
    pool.close()
    assert not slab.data.is_pinned()

    args = [
        *BASE,
        f"model.name={deep_tiny}",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.device=cuda",
        "train.max_grad_norm=0",
    ]
    run(load_config("full", [*args, f"output_dir={tmp_path / 'mem'}"]))
    off = run(load_config("full", [*args, *DISK, "offload.prefetch=1", f"output_dir={tmp_path / 'off'}"]))
    assert off["offload"]["device_buffer_bytes"] > 0
    mem_losses, off_losses = _losses(tmp_path / "mem"), _losses(tmp_path / "off")
    assert off_losses[0] == mem_losses[0]
    torch.testing.assert_close(off_losses, mem_losses, rtol=1e-4, atol=0)
    a, b = _weights(tmp_path / "mem" / "final"), _weights(tmp_path / "off" / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
