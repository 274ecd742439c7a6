"""The offload engine when things go wrong: a corrupted store file, a full disk mid-run, bad settings, an
unwritable or too small offload dir, a resume with the disk the run left: one clear error each, and what was
written resumes."""

import pytest
from slimtune_testutil import OFFLOAD_BASE as BASE
from slimtune_testutil import losses as _losses
from slimtune_testutil import run_cli as _cli
from slimtune_testutil import safetensors_dir as _weights

from slimtune.config import load_config
from slimtune.engines.offload import store as S
from slimtune.trainer import run

DISK = ["engine.name=offload"]
pytestmark = pytest.mark.usefixtures("small_chunks")


def test_a_corrupted_store_file_stops_the_run_naming_it(tmp_path):
    out = tmp_path / "run"
    args = [*BASE, *DISK, "train.batch_size=4", "checkpoint.every=2", "train.max_steps=3", f"output_dir={out}"]
    _cli("-m", "slimtune", "run", "full", *args)
    layer = next((out / "offload" / "snapshots" / "step_2").glob("layer.1.*.bin"))
    data = bytearray(layer.read_bytes())
    data[8192 + 100] ^= 0x01  # a byte of the first tensor's data (the header takes the first block(s))
    layer.write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_text()
    r = _cli(
        "-m",
        "slimtune",
        "run",
        "full",
        *args[:-2],
        "train.max_steps=5",
        f"output_dir={out}",
        "resume=true",
        check=False,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert "checksum mismatch" in last and layer.name.rsplit(".", 2)[0] in last
    assert (out / "metrics.jsonl").read_text().startswith(before)  # nothing trained after the bad read


def test_full_disk_mid_run_is_a_clear_error_and_the_checkpoint_resumes(tmp_path, monkeypatch):
    import errno

    from slimtune.errors import SlimtuneError

    args = [*BASE, *DISK, "train.max_grad_norm=0", "train.batch_size=4", "checkpoint.every=2", "checkpoint.keep=2"]
    run(load_config("full", [*args, f"output_dir={tmp_path / 'ref'}"]))
    real, calls = S.os.pwritev, {"n": 0}

    def pwritev(fd, bufs, offset):
        if (tmp_path / "b" / "checkpoints" / "step_4").is_dir():
            calls["n"] += 1
            if calls["n"] > 40:  # the disk fills up in the middle of step 5 or 6
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, offset)

    monkeypatch.setattr(S.os, "pwritev", pwritev)
    with pytest.raises(SlimtuneError, match="no space left on the device"):
        run(load_config("full", [*args, f"output_dir={tmp_path / 'b'}"]))
    monkeypatch.setattr(S.os, "pwritev", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_2", "step_4"]
    run(load_config("full", [*args, f"output_dir={tmp_path / 'b'}", "resume=true"]))
    assert _losses(tmp_path / "b") == _losses(tmp_path / "ref")


@pytest.mark.parametrize(
    "override, needle",
    [
        (["engine.name=offload", "engine.optimizer=none"], "set engine.optimizer=disk (not none)"),
        (
            ["engine.name=offload", "quant.method=lq_lora", "adapter.type=lq_lora"],
            "which quant.method=lq_lora does not give: change one of engine.name and quant.method",
        ),
        (
            ["engine.name=offload", "quant.method=nf4", "adapter.type=lora", "quant.backend=bitsandbytes"],
            "which quant.backend=bitsandbytes does not give: change one of engine.name and quant.backend",
        ),
        (["engine.name=offload", "engine.params=none", "offload.prefetch=0"], "offload.prefetch=0 must be >= 1"),
        (
            ["engine.name=offload", "quant.method=nf4", "adapter.type=lora", "offload.activations=keep"],
            "use offload.activations=recompute",
        ),
        (
            ["engine.name=offload", "qat.method=nf4", "offload.activations=keep"],
            "streamed base with qat.method=nf4; use offload.activations=recompute",
        ),
        (
            ["engine.name=offload", "qat.method=int4", "qat.learn_scales=true"],
            "which engine.params=disk keeps in the store until they stream: set engine.params=none",
        ),
        (
            [
                "engine.name=offload",
                "engine.params=none",
                "qat.method=int4",
                "qat.learn_scales=true",
                "qat.start_step=2",
            ],
            "set qat.start_step=0 or another engine.name",
        ),
        (
            ["engine.name=offload", "engine.params=none", "optim.in_backward=true", "train.max_grad_norm=0"],
            "optim.in_backward=true needs the optimizer step left to the trainer (not run by the engine inside "
            "backward), which engine.name=offload does not give",
        ),
    ],
)
def test_bad_offload_settings_are_one_line(override, needle, tmp_path):
    r = _cli("-m", "slimtune", "run", "full", *BASE, *override, f"output_dir={tmp_path / 'o'}", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_unwritable_or_too_small_offload_dir(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from slimtune.errors import SlimtuneError

    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SlimtuneError, match="offload.dir=.*not writable"):
        run(load_config("full", [*BASE, *DISK, f"offload.dir={blocked / 'sub'}", f"output_dir={tmp_path / 'a'}"]))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SlimtuneError, match=r"the store needs about .* GB .* but 0.0 GB are free"):
        run(load_config("full", [*BASE, *DISK, f"output_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_a_resume_needs_no_more_free_disk_than_the_run_left(tmp_path, monkeypatch):
    """The free-space check counts what the run's own store already holds (its checkpoints' snapshots, hard
    links): a resume with exactly the space the first run left is not refused; with less, the refusal names
    the figures (the bound, what the run holds, what is free)."""
    import shutil
    from collections import namedtuple

    from slimtune.engines.offload.rundir import bytes_held, offload_dir, store_bytes
    from slimtune.errors import SlimtuneError

    args = [*BASE, *DISK, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=2"]
    first = load_config("full", [*args, f"output_dir={tmp_path / 'o'}"])
    run(first)
    root = offload_dir(first)
    held = bytes_held(root)
    assert held > 0  # the snapshots of step 2 and 4
    weights = _weights(tmp_path / "o" / "final")
    numel = sum(t.numel() for t in weights.values())
    total = store_bytes(first, numel, numel)
    assert held < total  # a bound: every pinned version in full
    resume = load_config("full", [*args, "train.max_steps=6", "resume=true", f"output_dir={tmp_path / 'o'}"])
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, total - held - 10**5))
    with pytest.raises(SlimtuneError, match=r"needs about .* GB more .* the run already holds .* GB are free"):
        run(resume)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, total - held + 10**5))
    run(resume)  # the space the run needs beyond what it holds: enough (the old check wanted `total` free)
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert len(_losses(tmp_path / "o")) == 6
