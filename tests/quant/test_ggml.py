"""llama.cpp's block types (quant/ggml.py) against the `gguf` package's reference quantizer and dequantizer: the
same bytes, the same values; as a quantized base (saved, loaded, evaluated) and as a QAT grid (converted final/
equals the last step's fake-quantized model, and its blocks are what the gguf package would write for them)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from slimtune.cli import main
from slimtune.quant import GGML_TYPES, GGMLLinear, quantize_ggml
from slimtune.quant.ggml import GGMLFormat
from slimtune.quant.ggml_k import K_TYPES
from slimtune.quant.fake import QuantFormatSpec
from slimtune_testutil import TINY, safetensors_dir


def _weight(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-4, 1, 48)[:, None]
    w[1, :32] = 0  # an all-zero block
    w[2, 32:64] = 0.75  # a constant block
    w[3, :32] = torch.tensor([1.0, -1.0] * 16)  # |max| ties: the first one wins
    w[4, 32:64] = torch.linspace(-1, 1, 32) * 127 / 127.5  # values on ggml's half steps
    return w.to(dtype)


def _gguf_type(t: str):
    return getattr(GGMLQuantizationType, t.upper())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ggml_type", [t for t in GGML_TYPES if t not in K_TYPES])  # K types: test_ggml_k.py
def test_bytes_and_values_equal_the_gguf_reference(ggml_type, dtype):
    w = _weight(dtype)
    ours = quantize_ggml(w, GGMLFormat(ggml_type))
    ref = quants.quantize(w.float().numpy(), _gguf_type(ggml_type))
    assert ours.blocks.numel() == ref.size and ours.nbytes * 8 / w.numel() == GGMLFormat(ggml_type).bits_per_param(
        w.shape
    )
    assert np.array_equal(ours.blocks.numpy().reshape(ref.shape), ref)
    assert torch.equal(ours.dequantize(), torch.from_numpy(quants.dequantize(ref, _gguf_type(ggml_type))))
    assert torch.equal(ours.dequantize()[1, :32], torch.zeros(32))  # 0 stays 0 in an all-zero block


def test_rows_must_hold_whole_blocks():
    with pytest.raises(ValueError, match="blocks of 32; weight shape \\(8, 48\\)"):
        GGMLLinear(48, 8, fmt="q4_0")


@pytest.mark.parametrize("ggml_type", ["q4_0", "q5_1"])
def test_linear_computes_with_the_dequantized_weight_and_fake_quant_matches(ggml_type):
    lin = torch.nn.Linear(96, 48)
    with torch.no_grad():
        lin.weight.copy_(_weight())
    q = GGMLLinear.quantize_linear(lin, GGMLLinear.format_for(ggml_type))
    x = torch.randn(5, 96)
    ref = quants.dequantize(quants.quantize(lin.weight.detach().numpy(), _gguf_type(ggml_type)), _gguf_type(ggml_type))
    assert torch.equal(q(x), F.linear(x, torch.from_numpy(ref), lin.bias))
    assert torch.equal(QuantFormatSpec(ggml_type).round_trip(lin.weight.detach()), torch.from_numpy(ref))


def test_a_q4_0_base_saves_loads_and_evaluates(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "qlora", *TINY, "quant.method=q4_0", f"output_dir={out}"]) == 0
    manifest = json.loads((out / "slimtune_quant.json").read_text())
    assert {s["format"] for s in manifest["quantized"].values()} == {"q4_0"}
    assert manifest["bits_per_param"] == 4.5
    capsys.readouterr()
    assert main(["eval", *TINY, f"model.name={out}", "eval.max_batches=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_perplexity"] > 1


def test_qat_on_a_ggml_grid_converts_to_the_blocks_gguf_would_write(tmp_path):
    """qat.method=q4_0: final/ holds, for each linear, the blocks the gguf package's quantizer writes for the
    weights the run trained (no rounding left for an export), and scores as the last step's model."""
    from slimtune.config import load_config
    from slimtune.trainer import run

    out = tmp_path / "run"
    report = run(load_config("qat", [*TINY, "qat.method=q4_0", "train.max_steps=3", f"output_dir={out}"]))
    blocks = safetensors_dir(out / "final")
    manifest = json.loads((out / "final" / "slimtune_quant.json").read_text())
    assert manifest["method"] == "q4_0" and len(manifest["quantized"]) == 14
    name = "model.layers.0.mlp.down_proj"
    spec = manifest["quantized"][name]
    codes = blocks[f"{name}.blocks"].numpy().reshape(spec["out_features"], -1)
    deq = quants.dequantize(codes, GGMLQuantizationType.Q4_0)
    # re-quantizing what the file dequantizes to gives the same bytes: the codes are on llama.cpp's grid
    assert np.array_equal(quants.quantize(deq, GGMLQuantizationType.Q4_0), codes)
    assert report["eval_perplexity"] > 1
