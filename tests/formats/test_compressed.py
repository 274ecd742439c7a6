"""Compressed checkpoints: dfloat11 bit-exact, sparse exact on unstructured and N:M, sparse-nf4 equal to NF4 of
the kept values (computed here independently), bits per parameter by hand, eval / run / export load them,
a tampered file is one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtune.cli import main
from slimtune.formats.compressed import MANIFEST, TENSORS, decode_tensor, encode_tensor, nm_decode, nm_encode
from slimtune_testutil import TINY


def _weights(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).state_dict()


def _loaded(d, dtype="bfloat16"):
    from slimtune.model.load import load_base

    return load_base(str(d), dtype).state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny-llama in bf16, and its Wanda 50% / 2:4 pruned versions (bf16)."""
    root = tmp_path_factory.mktemp("cmp")
    assert main(["prune", *TINY, "model.dtype=bfloat16", f"output_dir={root / 'w50'}"]) == 0
    assert main(["prune", *TINY, "model.dtype=bfloat16", "prune.pattern=2:4", f"output_dir={root / 'w24'}"]) == 0
    from slimtune.formats.hf import load_model, load_tokenizer

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
    manifest = json.loads((out / MANIFEST).read_text())

    def reseal():  # the checksum made to match the changed file: the structure is still checked
        from slimtune.io import file_checksum

        manifest["checksums"][TENSORS] = file_checksum(out / TENSORS)
        (out / MANIFEST).write_text(json.dumps(manifest))

    reseal()
    assert main(["eval", *TINY, f"model.name={out}"]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and key.split("::")[0] in err and err.count("\n") == 1
    (out / TENSORS).write_bytes((out / TENSORS).read_bytes()[:1000])
    reseal()
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
    assert (
        main(
            [
                "run",
                "lora",
                *TINY,
                f"model.name={models / 'w50'}",
                "train.max_steps=4",
                "train.lr=1e-2",
                f"output_dir={run}",
            ]
        )
        == 0
    )
    out = tmp_path / "snf4"
    assert main(["export", str(run), "--format", "sparse-nf4", "--out", str(out)]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    from slimtune.adapters import adapter_modules
    from slimtune.model.load import load_base

    model = load_base(str(out), "float32")
    mods = adapter_modules(model)
    assert mods and all(m.weight_mask is not None for m in mods.values())  # mask * (B A) on the pruned base
    pruned = json.loads((models / "w50" / "slimtune_sparse.json").read_text())["matrices"]
    name = next(iter(pruned))
    zero = _weights(models / "w50")[f"{name}.weight"] == 0
    assert torch.all(mods[name].delta_weight()[zero] == 0) and mods[name].delta_weight().abs().sum() > 0
    assert main(["eval", *TINY, f"model.name={out}"]) == 0


def test_lowrank_factors_never_raise_the_masked_error_and_lower_it_on_real_structure():
    """LQ-LoRA's alternation on the kept entries: round 0 is no factors, so the error can only fall; on a
    matrix with low-rank structure it falls. Reference: NF4 of the kept values
    computed here with the quant module directly."""
    from slimtune.formats.sparse_lowrank import decompose
    from slimtune.quant.nf4 import quantize_nf4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.02 + torch.randn(96, 4, generator=g) @ torch.randn(4, 128, generator=g)
    keep = torch.rand(96, 128, generator=g) > 0.5
    w = w * keep
    d = decompose(w, keep, "nf4", rank=8)
    vals = torch.zeros(-(-int(keep.sum()) // 64) * 64)
    vals[: int(keep.sum())] = w[keep]
    q0 = quantize_nf4(vals, 64, double_quant=True).dequantize(torch.float32)[: int(keep.sum())]
    ref = (w[keep] - q0).norm() / w.norm()
    assert d["error_without"] == pytest.approx(float(ref), rel=1e-5)
    assert d["error"] < 0.85 * d["error_without"]  # measured 0.76x: the mask breaks the low rank
    # what the loader computes: quantized stored values + mask * L1 L2
    from slimtune.formats.sparse_lowrank import quantize_kept

    rebuilt = torch.zeros_like(w)
    rebuilt[keep] = quantize_kept(d["values"][keep], "nf4")
    rebuilt = rebuilt + keep * (d["L1"] @ d["L2"])
    assert float((rebuilt - w).norm() / w.norm()) == pytest.approx(d["error"], rel=1e-4)
    assert torch.all(rebuilt[~keep] == 0)


@pytest.mark.parametrize("pattern", ["w50", "w24"])
def test_sparse_nf4_with_rank_loads_as_values_plus_masked_factors(models, tmp_path, pattern):
    out = tmp_path / "r"
    assert main(["export", str(models / pattern), "--format", "sparse-nf4", "--rank", "4", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["adapter"] == "adapter" and manifest["lowrank"]["rank"] == 4
    assert manifest["lowrank"]["error"] <= manifest["lowrank"]["error_without"]
    assert not list(tmp_path.glob(".r-factors-*"))  # the factors' temporary dir is gone
    from slimtune.model.load import load_base
    from slimtune.adapters import adapter_modules

    src = _weights(models / pattern)
    model = load_base(str(out), "float32")
    mods = adapter_modules(model)
    pruned = json.loads((models / pattern / "slimtune_sparse.json").read_text())["matrices"]
    assert set(mods) == set(pruned)
    plain = (
        _loaded(tmp_path / "plain")
        if main(["export", str(models / pattern), "--format", "sparse-nf4", "--out", str(tmp_path / "plain")]) == 0
        else None
    )
    err_r = err_0 = 0.0
    for name, m in mods.items():
        w = src[f"{name}.weight"].float()
        eff = m.base.weight.float() + m.delta_weight()
        assert torch.all(eff[w == 0] == 0), name  # pruned weights stay exactly 0 under the masked factors
        if pattern == "w24":  # the 2:4 pattern holds in the loaded weight: <= 2 nonzeros per 4 consecutive inputs
            assert torch.all((w.reshape(-1, 4) != 0).sum(1) == 2), name  # (source: its zeros are exactly the mask)
            assert int((eff.reshape(-1, 4) != 0).sum(1).max()) <= 2, name
        err_r += float((eff - w).norm() ** 2)
        err_0 += float((plain[f"{name}.weight"].float() - w).norm() ** 2)
    assert err_r < err_0
    # the manifest's bytes count the factors
    assert manifest["bytes"] > json.loads((tmp_path / "plain" / MANIFEST).read_text())["bytes"]


def test_rank_needs_a_quantized_sparse_format(models, tmp_path, capsys):
    assert main(["export", str(models / "w50"), "--format", "sparse", "--rank", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--rank" in capsys.readouterr().err
    assert (
        main(["export", str(models / "w50"), "--format", "sparse-nf4", "--rank", "999", "--out", str(tmp_path / "y")])
        == 2
    )
    assert not (tmp_path / "y").exists()


def test_a_flipped_bit_that_still_parses_is_named(models, tmp_path, capsys):
    """A changed value byte leaves a file that parses and decodes (to other weights): the checksum names it."""
    out = tmp_path / "df"
    assert main(["export", str(models / "dense"), "--format", "dfloat11", "--out", str(out)]) == 0
    data = bytearray((out / TENSORS).read_bytes())
    stored = {k: v.clone() for k, v in load_file(str(out / TENSORS)).items()}
    key = next(k for k in stored if k.endswith("::sign_mantissa"))
    header = 8 + int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:header])[key]["data_offsets"]
    data[header + start] ^= 0x01  # one mantissa bit of one weight
    (out / TENSORS).write_bytes(bytes(data))
    tampered = load_file(str(out / TENSORS))
    assert not torch.equal(tampered[key], stored[key])  # it parses, with another value
    assert main(["eval", *TINY, f"model.name={out}"]) == 2
    err = capsys.readouterr().err
    assert TENSORS in err and "checksum" in err and err.count("\n") == 1


@pytest.mark.parametrize("src, fmt", [("dense", "dfloat11"), ("w50", "sparse-nf4"), ("w24", "sparse")])
def test_keep_compressed_gives_the_same_logits_with_layers_encoded(models, tmp_path, src, fmt):
    from slimtune.model.load import load_base

    out = tmp_path / fmt
    assert main(["export", str(models / src), "--format", fmt, "--out", str(out)]) == 0
    decoded = load_base(str(out), "float32")
    kept = load_base(str(out), "float32", keep_compressed=True)
    layer_params = [p for n, p in kept.named_parameters() if ".layers." in n and p.dim() == 2]
    assert layer_params and all(p.untyped_storage().nbytes() <= 4 for p in layer_params)  # nothing decoded
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kept(ids).logits, decoded(ids).logits)
    assert all(p.untyped_storage().nbytes() <= 4 for p in layer_params)  # dropped again after the forward
    with pytest.raises(Exception, match="keep_compressed"):  # training would keep every decoded weight
        next(kept.parameters()).requires_grad_(True)
        kept.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        kept(ids)


def test_keep_compressed_on_the_cli(models, tmp_path, capsys):
    out = tmp_path / "df"
    assert main(["export", str(models / "dense"), "--format", "dfloat11", "--out", str(out)]) == 0
    assert main(["eval", *TINY, f"model.name={out}"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", *TINY, f"model.name={out}", "model.keep_compressed=true"]) == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kept == plain
    gen = ["generate", f"model.name={out}", "prompt=The", "max_new_tokens=6", "temperature=0"]
    assert main(gen) == 0
    text = capsys.readouterr().out
    assert main([*gen, "model.keep_compressed=true"]) == 0  # every new token's forward decodes the layers
    assert capsys.readouterr().out == text
    assert (
        main(["run", "lora", *TINY, f"model.name={out}", "model.keep_compressed=true", f"output_dir={tmp_path / 'r'}"])
        == 2
    )
    assert "model.keep_compressed" in capsys.readouterr().err
    assert main(["eval", *TINY, f"model.name={models / 'dense'}", "model.keep_compressed=true"]) == 2
    assert "needs a compressed checkpoint" in capsys.readouterr().err
