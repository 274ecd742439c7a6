"""A step checkpoint may be copied from elsewhere: checksums.json holds an xxh3-128 checksum of every file the
checkpoint holds, each file is verified before it is read, a name it lists must be a file of the checkpoint
dir, and a checkpoint without checksums.json (an older slimtune's) is refused, in one line on the CLI."""

import json

import pytest
import torch
from slimtune_testutil import TINY
from torch import nn

from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.formats import checkpoint as ckpt


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def saved(tmp_path):
    model, opt = _model_and_optimizer()
    masks = {"0": torch.ones(8, 8, dtype=torch.uint8)}
    return ckpt.save_checkpoint(
        tmp_path / "checkpoints", 3, model, opt, {"tokens": 12}, "train:\n  seed: 0\n", 2, extra={ckpt.MASKS: masks}
    )


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor's last byte: the file still parses, with another value
    path.write_bytes(bytes(data))


def test_a_checkpoint_records_and_checks_every_file(saved):
    assert (saved / ckpt.CHECKSUMS).is_file()
    sums = json.loads((saved / ckpt.CHECKSUMS).read_text())["checksums"]
    assert set(sums) == {p.name for p in saved.iterdir()} - {ckpt.CHECKSUMS, ckpt.MARKER}
    model, opt = _model_and_optimizer(seed=1)
    assert ckpt.load_checkpoint(saved, model, opt)["step"] == 3
    want, _ = _model_and_optimizer()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    assert set(ckpt.load_extra(saved, ckpt.MASKS)) == {"0"}


@pytest.mark.parametrize("fname", ["trainable.safetensors", "optimizer.safetensors"])
def test_a_flipped_byte_is_refused(saved, fname):
    _flip_last_byte(saved / fname)
    with pytest.raises(SlimtuneError, match=f"is corrupted: {fname} is missing or does not match its checksum"):
        ckpt.load_checkpoint(saved, *_model_and_optimizer())


def test_a_tampered_extra_or_state_file_is_refused(saved):
    _flip_last_byte(saved / ckpt.MASKS)
    with pytest.raises(SlimtuneError, match=f"{ckpt.MASKS} is missing or does not match"):
        ckpt.load_extra(saved, ckpt.MASKS)
    state = json.loads((saved / "trainer_state.json").read_text())
    (saved / "trainer_state.json").write_text(json.dumps({**state, "step": 1000}))
    with pytest.raises(SlimtuneError, match="trainer_state.json is missing or does not match"):
        ckpt.read_state(saved)


def test_a_checkpoint_without_checksums_is_refused(saved):
    (saved / ckpt.CHECKSUMS).unlink(missing_ok=True)
    with pytest.raises(SlimtuneError, match="has no checksums.json .*older slimtune"):
        ckpt.load_checkpoint(saved, *_model_and_optimizer())


def test_a_checksum_name_outside_the_checkpoint_is_refused(saved):
    f = saved / ckpt.CHECKSUMS
    listing = json.loads(f.read_text()) if f.is_file() else {"checksums": {}}
    listing["checksums"]["../../x"] = "0" * 32
    (saved / ckpt.CHECKSUMS).write_text(json.dumps(listing))
    with pytest.raises(SlimtuneError, match="checksums names '../../x', which is not a file inside"):
        ckpt.load_checkpoint(saved, *_model_and_optimizer())


def test_resuming_from_a_tampered_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "lora", *TINY, "checkpoint.every=1", f"output_dir={out}"]
    assert main([*args, "train.max_steps=2"]) == 0
    step = ckpt.complete_checkpoints(out / "checkpoints")[-1]  # the one resume reads
    _flip_last_byte(step / "trainable.safetensors")
    capsys.readouterr()
    assert main([*args, "train.max_steps=3", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainable.safetensors" in err and "checksum" in err, err
    (step / ckpt.CHECKSUMS).unlink(missing_ok=True)
    assert main([*args, "train.max_steps=3", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checksums.json" in err, err
