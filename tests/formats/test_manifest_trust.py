"""Every manifest slimtune reads is untrusted input (a downloaded export, quantized checkpoint or pruned
model dir): each file a loader reads has a checksum in the manifest and is verified before it is read
(tokenizer files included), every name the manifest lists is a relative path inside its dir, old versions
without checksums are refused, and a Hugging Face cache layout (files symlinked into ../blobs) still loads.
Each refusal is one line on the CLI (exit 2)."""

import json
import os
import shutil

import pytest
import torch
from slimtune_testutil import TINY

from slimtune.cli import main
from slimtune.formats.compressed import MANIFEST, TENSORS
from slimtune.errors import SlimtuneError
from slimtune.io import file_checksum

QUANT, SPARSE = "slimtune_quant.json", "slimtune_sparse.json"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A compressed export (dfloat11, a chat template in its tokenizer), a quantized checkpoint (nf4) and a
    pruned model dir (magnitude 50%), each written by slimtune."""
    from slimtune.formats.quantized import save_quantized
    from slimtune.formats.hf import load_model, load_tokenizer
    from slimtune.quant import quantize_model

    root = tmp_path_factory.mktemp("trust")
    model, tok = load_model("tiny-llama", "bfloat16"), load_tokenizer("tiny-llama")
    tok.chat_template = TEMPLATE
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    assert main(["export", str(root / "dense"), "--format", "dfloat11", "--out", str(root / "df")]) == 0
    q = load_model("tiny-llama")
    quantize_model(q, "nf4")
    save_quantized(q, root / "q", tok, {"method": "nf4", "base_model": "tiny-llama"})
    assert main(["prune", *TINY, "prune.method=magnitude", f"output_dir={root / 'sparse'}"]) == 0
    return root


@pytest.fixture
def copy(made, tmp_path):
    """A fresh copy of one of `made`'s dirs, to tamper with."""

    def fn(name):
        shutil.copytree(made / name, tmp_path / name)
        return tmp_path / name

    return fn


def _edit(path, fn):
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def _sums(manifest):
    """The manifest's checksums (an empty record where it has none: what the old writers wrote)."""
    return manifest.setdefault("checksums", {})


def _flip_value(path, suffix=""):
    """Flip the low bit of the first value of a floating tensor (key ending in `suffix`): the file still
    parses, with another weight."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:header])
    key = next(
        k
        for k, v in meta.items()
        if k != "__metadata__"
        and k.endswith(suffix)
        and (suffix or v["dtype"] in ("F32", "BF16", "F16"))
        and v["data_offsets"][1] > v["data_offsets"][0]
    )
    data[header + meta[key]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))


def _refused(capsys, model_dir, *needles):
    """`slimtune eval model.name=model_dir` exits 2 with one line holding every needle."""
    capsys.readouterr()
    assert main(["eval", *TINY, f"model.name={model_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(n in err for n in needles), err
    return err


def _as_hf_snapshot(d, blobs):
    """Move every file of `d` into `blobs` and link it back by a relative symlink, as a Hugging Face cache
    snapshot does (snapshots/<rev>/f -> ../../blobs/<hash>)."""
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        blob = blobs / f"{len(list(blobs.iterdir())):03d}-{f.name}"
        shutil.move(f, blob)
        f.symlink_to(os.path.relpath(blob, f.parent))


def _logits(model):
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------ compressed exports


def _load_compressed(d):
    from slimtune.formats.compressed_io import load_compressed

    return load_compressed(d, torch.float32)


def test_compressed_flipped_weight_with_its_checksum_dropped_is_refused(copy, capsys):
    d = copy("df")
    _flip_value(d / TENSORS, "::sign_mantissa")
    _edit(d / MANIFEST, lambda m: _sums(m).pop(TENSORS, None))
    with pytest.raises(SlimtuneError, match=f"no entry for {TENSORS}"):
        _load_compressed(d)
    _refused(capsys, d, TENSORS, "checksums")


def test_compressed_manifest_without_checksums_is_refused(copy, capsys):
    d = copy("df")
    _edit(d / MANIFEST, lambda m: m.pop("checksums", None))
    _refused(capsys, d, str(d / MANIFEST), "no 'checksums'", "export it again")


@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja"])
def test_compressed_tampered_tokenizer_file_is_refused(copy, capsys, name):
    from slimtune.formats.hf import load_tokenizer

    d = copy("df")
    assert (d / name).is_file()
    with open(d / name, "a") as f:
        f.write(" ")
    with pytest.raises(SlimtuneError, match=f"{name}: its bytes do not match the checksum"):
        load_tokenizer(str(d))
    _refused(capsys, d, name, "checksum")


def test_compressed_added_tokenizer_file_is_refused(copy, capsys):
    d = copy("df")
    (d / "added_tokens.json").write_text('{"<evil>": 7}')
    _refused(capsys, d, "no entry for added_tokens.json")


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_compressed_adapter_outside_the_export_is_refused_and_nothing_loaded(
    copy, monkeypatch, tmp_path, capsys, where
):
    from slimtune.formats import compressed_io

    d = copy("df")
    (tmp_path / "x").mkdir()  # an adapter dir beside the export
    (tmp_path / "x" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    name = "../x" if where == "relative" else str(tmp_path / "x")
    _edit(d / MANIFEST, lambda m: m.update(adapter=name))
    loaded = []
    monkeypatch.setattr(compressed_io, "_load_adapter", lambda *a: loaded.append(a))
    with pytest.raises(SlimtuneError, match="adapter names .*not a file inside"):
        _load_compressed(d)
    assert not loaded
    _refused(capsys, d, "adapter", repr(name))


def test_compressed_checksum_key_outside_the_export_is_refused(copy, tmp_path, capsys):
    d = copy("df")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "x").write_text("outside")
    key = "../etc/x"
    _edit(d / MANIFEST, lambda m: _sums(m).update({key: file_checksum(tmp_path / "etc" / "x")}))
    with pytest.raises(SlimtuneError, match="checksums names '../etc/x'"):
        _load_compressed(d)
    _edit(d / MANIFEST, lambda m: _sums(m).pop(key))
    _edit(d / MANIFEST, lambda m: _sums(m).update({"../../etc/x": "0" * 32}))
    _refused(capsys, d, "checksums", "'../../etc/x'", "not a file inside")


def test_compressed_version_1_export_must_be_exported_again(copy, capsys):
    d = copy("df")
    _edit(d / MANIFEST, lambda m: m.update(version=1))
    _refused(capsys, d, "version 1", "export it again")


def test_compressed_export_in_a_hf_cache_layout_loads_and_is_still_verified(made, copy, tmp_path, capsys):
    d = copy("df")
    assert {"tokenizer.json", "chat_template.jinja", "config.json", TENSORS} <= set(
        json.loads((d / MANIFEST).read_text())["checksums"]
    )
    want = _logits(_load_compressed(made / "df"))
    _as_hf_snapshot(d, tmp_path / "blobs")
    assert (d / TENSORS).is_symlink()
    assert torch.equal(_logits(_load_compressed(d)), want)
    with open(os.path.realpath(d / "chat_template.jinja"), "a") as f:  # the blob behind the link
        f.write("{{ 'x' }}")
    _refused(capsys, d, "chat_template.jinja", "checksum")


# ------------------------------------------------------------------ quantized checkpoints


def _load_quantized(d):
    from slimtune.formats.quantized import load_quantized

    return load_quantized(d)


def test_quantized_flipped_weight_with_its_checksum_dropped_is_refused(copy, capsys):
    d = copy("q")
    _flip_value(d / "model.safetensors")
    _edit(d / QUANT, lambda m: _sums(m).pop("model.safetensors", None))
    with pytest.raises(SlimtuneError, match="no entry for model.safetensors"):
        _load_quantized(d)
    _refused(capsys, d, QUANT, "model.safetensors")


def test_quantized_manifest_without_checksums_or_of_version_2_is_refused(copy, capsys):
    d = copy("q")
    _edit(d / QUANT, lambda m: m.pop("checksums", None))
    _refused(capsys, d, "no 'checksums'", "slimtune quantize")
    _edit(d / QUANT, lambda m: m.update(version=2))
    _refused(capsys, d, "version 2", "slimtune quantize")


def test_quantized_tampered_tokenizer_file_or_outside_key_is_refused(copy, tmp_path, capsys):
    d = copy("q")
    with open(d / "chat_template.jinja", "a") as f:
        f.write(" ")
    _refused(capsys, d, "chat_template.jinja", "checksum")
    shutil.rmtree(d)
    d = copy("q")
    (tmp_path / "outside").write_text("x")
    _edit(d / QUANT, lambda m: _sums(m).update({"../outside": file_checksum(tmp_path / "outside")}))
    with pytest.raises(SlimtuneError, match="checksums names '../outside'"):
        _load_quantized(d)


def test_quantized_checkpoint_in_a_hf_cache_layout_loads_and_is_still_verified(made, copy, tmp_path, capsys):
    d = copy("q")
    want = _logits(_load_quantized(made / "q"))
    _as_hf_snapshot(d, tmp_path / "blobs")
    assert torch.equal(_logits(_load_quantized(d)), want)
    _flip_value(d / "model.safetensors")  # through the link: the blob
    _refused(capsys, d, "model.safetensors", "checksum")


# ------------------------------------------------------------------ pruned (sparse) model dirs


def test_sparse_flipped_weight_with_its_checksum_dropped_is_refused(copy, capsys):
    from slimtune.formats.hf import load_model

    d = copy("sparse")
    _flip_value(d / "model.safetensors")
    _edit(d / SPARSE, lambda m: _sums(m).pop("model.safetensors", None))
    with pytest.raises(SlimtuneError, match="no entry for model.safetensors"):
        load_model(str(d))
    _refused(capsys, d, SPARSE, "model.safetensors")


def test_sparse_manifest_without_checksums_is_refused(copy, capsys):
    d = copy("sparse")
    _edit(d / SPARSE, lambda m: m.pop("checksums", None))
    _refused(capsys, d, "no 'checksums'", "slimtune prune")
    assert main(["export", str(d), "--format", "sparse", "--out", str(d.parent / "out")]) == 2
    assert not (d.parent / "out").exists()  # nothing created


def test_sparse_tampered_tokenizer_file_or_outside_key_is_refused(copy, tmp_path, capsys):
    d = copy("sparse")
    with open(d / "tokenizer_config.json", "a") as f:
        f.write(" ")
    _refused(capsys, d, "tokenizer_config.json", "checksum")
    shutil.rmtree(d)
    d = copy("sparse")
    _edit(d / SPARSE, lambda m: _sums(m).update({"/etc/hostname": "0" * 32}))
    _refused(capsys, d, "checksums", "'/etc/hostname'", "not a file inside")


def test_an_export_written_inside_the_pruned_dir_leaves_it_loadable(copy, capsys):
    """`slimtune export PRUNED --format sparse` writes PRUNED/sparse/ by default: a subdir no loader reads."""
    from slimtune.formats.compressed_io import load_compressed
    from slimtune.formats.hf import load_model

    d = copy("sparse")
    assert main(["export", str(d), "--format", "sparse"]) == 0
    load_model(str(d))
    load_compressed(d / "sparse")


def test_sparse_dir_in_a_hf_cache_layout_loads_and_is_still_verified(made, copy, tmp_path, capsys):
    from slimtune.formats.hf import load_model

    d = copy("sparse")
    want = _logits(load_model(str(made / "sparse")))
    _as_hf_snapshot(d, tmp_path / "blobs")
    assert torch.equal(_logits(load_model(str(d))), want)
    with open(os.path.realpath(d / "tokenizer.json"), "a") as f:
        f.write(" ")
    _refused(capsys, d, "tokenizer.json", "checksum")
