"""`slimtune export --format compressed-tensors` (formats/compressed_tensors.py): the packing equals the
compressed-tensors package's; transformers (with compressed-tensors) loads the export and gives the logits of
slimtune's own model of the same codes, bit for bit in fp32, for a quantized base (int4 / int3 / int8 / q4_0) and a
QAT run; a 2:4-sparse quantized model says so in `sparsity_config`; grids it has no layout for are one line."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from slimtune.cli import main
from slimtune.formats.compressed_tensors import pack_int32
from slimtune.model.load import load_base
from slimtune_testutil import TINY

IDS = torch.tensor([[1, 5, 9, 200, 31, 7, 64, 3]])


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_equals_the_compressed_tensors_package(bits):
    torch.manual_seed(bits)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 72), dtype=torch.int8)  # 72: a partial last run
    assert torch.equal(pack_int32(q, bits), pack_to_int32(q, bits))


def _transformers_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


def _slimtune_logits(path) -> torch.Tensor:
    with torch.no_grad():
        return load_base(str(path), "float32")(IDS).logits


@pytest.mark.parametrize(
    "quant, group",
    [
        (["quant.method=int4", "quant.block_size=32", "quant.double_quant=false"], "int4/group 32"),
        (["quant.method=int3", "quant.block_size=64", "quant.double_quant=true"], "int3/group 64"),
        (["quant.method=int8", "quant.block_size=64"], "int8/group 64"),
        (["quant.method=q4_0"], "int4/group 32"),
    ],
)
def test_transformers_loads_a_quantized_base_with_its_logits(quant, group, tmp_path, capsys):
    src, out = tmp_path / "q", tmp_path / "ct"
    assert main(["quantize", "qlora", *TINY, *quant, f"output_dir={src}"]) == 0
    capsys.readouterr()
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.split("(", 1)[1].rstrip().removesuffix(")"))
    assert summary["quantized"] == 14 and summary["groups"] == {group: 14} and summary["sparsity"] is None
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert torch.equal(_transformers_logits(out), _slimtune_logits(src))


def test_a_qat_run_exports_the_codes_it_trained(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = ["qat.method=int4", "quant.block_size=32", "train.max_steps=2", f"output_dir={run_dir}"]
    assert main(["run", "qat", *TINY, *overrides]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "compressed-tensors"]) == 0
    assert torch.equal(_transformers_logits(run_dir / "compressed-tensors"), _slimtune_logits(run_dir / "final"))


def test_a_2_4_sparse_quantized_model_says_so(tmp_path, capsys):
    model = load_base("tiny-llama", "float32")
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("_proj"):
                w = m.weight.view(-1, 4)
                w.scatter_(1, w.abs().argsort(dim=1)[:, :2], 0.0)  # the 2 smallest of every 4 along a row
    model.save_pretrained(tmp_path / "sparse")
    from slimtune.formats.hf import load_tokenizer

    load_tokenizer("tiny-llama").save_pretrained(tmp_path / "sparse")
    src, out = tmp_path / "q", tmp_path / "ct"
    args = [*TINY, f"model.name={tmp_path / 'sparse'}", "quant.method=int4", "quant.block_size=32"]
    assert main(["quantize", "qlora", *args, f"output_dir={src}"]) == 0
    capsys.readouterr()
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(out)]) == 0
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["format"] == "dense"
    assert sparsity["global_sparsity"] >= 0.5
    assert torch.equal(_transformers_logits(out), _slimtune_logits(src))


@pytest.mark.parametrize(
    "source, needle",
    [
        (["quant.method=nf4"], "has no compressed-tensors grid"),
        (["quant.method=int4a", "quant.block_size=32"], "has no compressed-tensors grid"),
        (None, "this model has none"),
    ],
)
def test_what_has_no_layout_is_one_line(source, needle, tmp_path, capsys):
    src = "tiny-llama"
    if source is not None:
        src = str(tmp_path / "q")
        assert main(["quantize", "qlora", *TINY, *source, f"output_dir={src}"]) == 0
    capsys.readouterr()
    assert main(["export", src, "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "ct").exists()
