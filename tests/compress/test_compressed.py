"""Compressed checkpoints: dfloat11 bit-exact, sparse exact on unstructured and N:M, sparse-nf4 equal to NF4 of
the kept values (computed here independently), bits per parameter by hand, eval / run / export load them,
a tampered file is one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtune.cli import main
from slimtune.compress.compressed import MANIFEST, TENSORS, decode_tensor, encode_tensor, nm_decode, nm_encode
from slimtune_testutil import TINY


def _weights(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).state_dict()


def _loaded(d, dtype="bfloat16"):
    from slimtune.compress.load import load_base

    return load_base(str(d), dtype).state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny-llama in bf16, and its Wanda 50% / 2:4 pruned versions (bf16)."""
    root = tmp_path_factory.mktemp("cmp")
    assert main(["prune", *TINY, "model.dtype=bfloat16", f"output_dir={root / 'w50'}"]) == 0
    assert main(["prune", *TINY, "model.dtype=bfloat16", "prune.pattern=2:4", f"output_dir={root / 'w24'}"]) == 0
    from slimtune.models import load_model, load_tokenizer

    m = load_model("tiny-llama", "bfloat16")
    m.save_pretrained(root / "dense")
    load_tokenizer("tiny-llama").save_pretrained(root / "dense")
    return root


def test_dfloat11_is_bit_exact_and_smaller(models, tmp_path):
    out = tmp_path / "df"
    assert main(["export", str(models / "dense"), "--format", "dfloat11", "--out", str(out)]) == 0
    a, b = _weights(models / "dense"), _loaded(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)  # bit for bit
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["ratio_to_bf16"] < 0.85  # a tiny model: config and manifest weigh in


@pytest.mark.parametrize("pattern", ["w50", "w24"])
@pytest.mark.parametrize("fmt", ["sparse", "sparse-nf4"])
def test_sparse_formats_round_trip(models, tmp_path, pattern, fmt):
    out = tmp_path / fmt
    src = models / pattern
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 0
    a, b = _weights(src), _loaded(out)
    pruned = json.loads((src / "slimtune_sparse.json").read_text())["matrices"]
    for k in a:
        if k.removesuffix(".weight") in pruned and fmt == "sparse-nf4":
            from slimtune.quant.nf4 import quantize_nf4

            keep = a[k] != 0
            kept = a[k][keep].float()
            pad = torch.zeros(-(-kept.numel() // 64) * 64)
            pad[: kept.numel()] = kept
            want = torch.zeros_like(a[k])
            want[keep] = quantize_nf4(pad, 64).dequantize(torch.float32)[: kept.numel()].to(a[k].dtype)
            assert torch.equal(b[k], want), k  # NF4 of the kept values, zeros where pruned
        else:
            assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k  # exact (dense: dfloat11)
    assert main(["eval", *TINY, f"model.name={out}", "model.dtype=bfloat16"]) == 0


def test_bits_per_parameter_by_hand():
    torch.manual_seed(0)
    w = torch.randn(64, 256).to(torch.bfloat16)
    w[torch.rand_like(w, dtype=torch.float32) < 0.5] = 0
    entries, rec = encode_tensor("w", w, "sparse", pruned=True)
    n = w.numel()
    assert entries["w::mask"].numel() == n // 8  # 1 bit per weight
    assert entries["w::v.values"].numel() * 2 == int((w != 0).sum()) * 2  # bf16 per kept value
    w24 = w.clone().reshape(-1, 4)
    w24 = torch.where(torch.arange(4) < 2, torch.randn(w24.shape).to(torch.bfloat16), 0).reshape(64, 256)
    entries, rec = encode_tensor("w", w24, "sparse", nm=(2, 4), pruned=True)
    assert entries["w::patterns"].numel() == n // 4 * 3 // 8  # 3 bits per group of 4
    bits = 8 * sum(t.numel() * t.element_size() for t in entries.values()) / n
    assert bits == 8.75  # one of 6 patterns per group (3 bits / 4 weights) + 16 bits x 1/2
    back = decode_tensor("w", rec, {k.split("::")[1]: v for k, v in entries.items()})
    assert torch.equal(back, w24)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_patterns_round_trip(n, m):
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(32, 64, dtype=torch.bool).reshape(-1, m)
    for row in keep:
        row[torch.randperm(m, generator=g)[:n]] = True
    keep = keep.reshape(32, 64)
    assert torch.equal(nm_decode(nm_encode(keep, n, m), keep.shape, n, m), keep)


def test_runs_train_on_a_compressed_base(models, tmp_path):
    out = tmp_path / "df"
    assert main(["export", str(models / "dense"), "--format", "dfloat11", "--out", str(out)]) == 0
    run = tmp_path / "run"
    assert main(["run", "lora", *TINY, f"model.name={out}", "train.max_steps=3", f"output_dir={run}"]) == 0
    assert (run / "final" / "adapter_config.json").is_file()


def test_a_tampered_file_is_one_line(models, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["export", str(models / "w50"), "--format", "sparse", "--out", str(out)]) == 0
    stored = load_file(str(out / TENSORS))
    key = next(k for k in stored if k.endswith("::mask"))
    stored[key] = stored[key][:-4]  # truncated bitmask
    save_file(stored, str(out / TENSORS))
    assert main(["eval", *TINY, f"model.name={out}"]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and key.split("::")[0] in err and err.count("\n") == 1
    (out / TENSORS).write_bytes((out / TENSORS).read_bytes()[:1000])
    assert main(["eval", *TINY, f"model.name={out}"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_sparse_needs_a_pruned_model_and_out_must_be_empty(models, tmp_path, capsys):
    assert main(["export", str(models / "dense"), "--format", "sparse", "--out", str(tmp_path / "x")]) == 2
    assert "slimtune prune" in capsys.readouterr().err
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("keep me")
    assert main(["export", str(models / "dense"), "--format", "dfloat11", "--out", str(tmp_path / "y")]) == 2
    assert (tmp_path / "y" / "f").read_text() == "keep me"


def test_a_lora_recovery_run_keeps_its_adapter_beside_sparse_nf4(models, tmp_path):
    run = tmp_path / "rec"
    assert main(["run", "lora", *TINY, f"model.name={models / 'w50'}", "train.max_steps=4", "train.lr=1e-2",
                 f"output_dir={run}"]) == 0
    out = tmp_path / "snf4"
    assert main(["export", str(run), "--format", "sparse-nf4", "--out", str(out)]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    from slimtune.adapters import adapter_modules
    from slimtune.compress.load import load_base

    model = load_base(str(out), "float32")
    mods = adapter_modules(model)
    assert mods and all(m.weight_mask is not None for m in mods.values())  # mask * (B A) on the pruned base
    pruned = json.loads((models / "w50" / "slimtune_sparse.json").read_text())["matrices"]
    name = next(iter(pruned))
    zero = _weights(models / "w50")[f"{name}.weight"] == 0
    assert torch.all(mods[name].delta_weight()[zero] == 0) and mods[name].delta_weight().abs().sum() > 0
    assert main(["eval", *TINY, f"model.name={out}"]) == 0
