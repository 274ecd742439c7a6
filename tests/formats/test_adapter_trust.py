"""An adapter dir slimtune wrote (PEFT's files + slimtune_adapter.json, or sparse_ft's) is untrusted input once
downloaded: slimtune_adapter.json holds a checksum of every other file, verified before any is read, each
name it lists is a relative path inside the dir, a manifest without checksums (or sparse_ft version 1) is
refused, and a Hugging Face cache layout (files symlinked into ../blobs) still loads. A dir the peft library
wrote (no slimtune_adapter.json) loads as PEFT loads it (tests/formats/test_peft_format.py)."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from slimtune_testutil import TINY

from slimtune.adapters import adapter_modules, apply_adapters
from slimtune.adapters.inject import replace_module
from slimtune.formats.peft import load_peft_adapter, save_peft_adapter
from slimtune.adapters.sparse_ft import SparseFTLinear
from slimtune.formats.sparse_ft import load_sparse_ft, save_sparse_ft
from slimtune.cli import main
from slimtune.adapters.lora import LoRAConfig
from slimtune.config import AdapterConfig
from slimtune.errors import SlimtuneError
from slimtune.io import file_checksum
from slimtune.formats.hf import load_model

META = "slimtune_adapter.json"
WEIGHTS = {"peft": "adapter_model.safetensors", "sparse_ft": "sparse_ft.safetensors"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter (PEFT format) and a sparse_ft adapter of tiny-llama, saved by slimtune."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(1)
    model, cfg = load_model("tiny-llama"), LoRAConfig(rank=4, alpha=16.0)
    apply_adapters(model, AdapterConfig(target_modules="all-linear"), cfg)
    for m in adapter_modules(model).values():  # B != 0, as after training
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    save_peft_adapter(model, cfg, root / "peft", "tiny-llama", str(tiny_model_dir))
    model = load_model("tiny-llama")
    for i in range(2):
        name = f"model.layers.{i}.self_attn.q_proj"
        m = SparseFTLinear(model.get_submodule(name), num_params=64, seed=i)
        with torch.no_grad():
            m.deltas.normal_(std=0.05)
        replace_module(model, name, m)
    save_sparse_ft(model, SimpleNamespace(density=0.01), root / "sparse_ft", "tiny-llama", str(tiny_model_dir))
    return root


@pytest.fixture
def copy(saved, tmp_path):
    def fn(fmt):
        shutil.copytree(saved / fmt, tmp_path / fmt)
        return tmp_path / fmt

    return fn


def _load(d, fmt):
    model = load_model("tiny-llama").eval()
    (load_peft_adapter if fmt == "peft" else load_sparse_ft)(model, d)
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _edit(d, fn):
    meta = json.loads((d / META).read_text())
    fn(meta)
    (d / META).write_text(json.dumps(meta))


def _sums(meta):
    """The manifest's checksums (an empty record where it has none: what the old writers wrote)."""
    return meta.setdefault("checksums", {})


def _flip_value(path):
    """Flip the low bit of the first value of the first floating tensor: the file still parses."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:header])
    key = next(k for k, v in meta.items() if k != "__metadata__" and v["dtype"] in ("F32", "BF16"))
    data[header + meta[key]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))


def _refused(capsys, d, *needles):
    capsys.readouterr()
    assert main(["eval", *TINY, f"model.name={d}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(n in err for n in needles), err


FORMATS = pytest.mark.parametrize("fmt", ["peft", "sparse_ft"])


@FORMATS
def test_flipped_weight_with_its_checksum_dropped_is_refused(copy, capsys, fmt):
    d = copy(fmt)
    _flip_value(d / WEIGHTS[fmt])
    _edit(d, lambda m: _sums(m).pop(WEIGHTS[fmt], None))
    with pytest.raises(SlimtuneError, match=f"no entry for {WEIGHTS[fmt]}"):
        _load(d, fmt)
    _refused(capsys, d, META, WEIGHTS[fmt])


@FORMATS
def test_a_manifest_without_checksums_is_refused(copy, capsys, fmt):
    d = copy(fmt)
    _edit(d, lambda m: m.pop("checksums", None))
    with pytest.raises(SlimtuneError, match="no 'checksums'"):
        _load(d, fmt)
    _refused(capsys, d, META, "no 'checksums'")


@FORMATS
def test_a_checksum_key_outside_the_dir_is_refused(copy, tmp_path, capsys, fmt):
    d = copy(fmt)
    (tmp_path / "outside").write_text("x")
    _edit(d, lambda m: _sums(m).update({"../outside": file_checksum(tmp_path / "outside")}))
    with pytest.raises(SlimtuneError, match="checksums names '../outside', which is not a file inside"):
        _load(d, fmt)
    _edit(d, lambda m: _sums(m).pop("../outside"))
    _edit(d, lambda m: _sums(m).update({"/etc/hostname": "0" * 32}))
    _refused(capsys, d, "'/etc/hostname'", "not a file inside")


def test_a_tampered_peft_config_is_refused(copy, capsys):
    d = copy("peft")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 4  # still a valid config: the adapter would load four times as strong
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlimtuneError, match="adapter_config.json: its bytes do not match the checksum"):
        _load(d, "peft")
    _refused(capsys, d, "adapter_config.json", "checksum")


def test_sparse_ft_version_1_is_refused(copy, capsys):
    d = copy("sparse_ft")
    _edit(d, lambda m: m.update(version=1))
    with pytest.raises(SlimtuneError, match="version 1"):
        _load(d, "sparse_ft")


@FORMATS
def test_an_adapter_in_a_hf_cache_layout_loads_and_is_still_verified(saved, copy, tmp_path, capsys, fmt):
    d = copy(fmt)
    assert set(json.loads((d / META).read_text()).get("checksums", {})) >= {WEIGHTS[fmt]}
    want = _load(saved / fmt, fmt)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in sorted(d.iterdir()):
        shutil.move(f, blobs / f.name)
        f.symlink_to(os.path.relpath(blobs / f.name, d))
    assert (d / WEIGHTS[fmt]).is_symlink()
    assert torch.equal(_load(d, fmt), want)
    _flip_value(blobs / WEIGHTS[fmt])
    _refused(capsys, d, WEIGHTS[fmt], "checksum")
