"""`slimtune export --format gguf` (formats/gguf.py): read back by the `gguf` package's reader (every tensor
dequantized by its own code equals what slimtune's model holds, q / k rows in llama.cpp's rotary order) and
loaded by transformers' GGUF loader, whose logits equal slimtune's model's; a QAT run's codes go in as trained."""

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants

from slimtune.cli import main
from slimtune.formats.gguf import gguf_name, rotary_rows
from slimtune.formats.hf import load_tokenizer
from slimtune.model.load import load_base
from slimtune_testutil import TINY, sentencepiece_style_tokenizer


# a small decoder (2 layers, hidden 64, GQA) for the architecture tests
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SMALL |= dict(num_key_value_heads=2, max_position_embeddings=256)


def _read(path) -> dict:
    r = GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        values = quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(values)).float())
    return out


def _expected(model, name: str) -> torch.Tensor:
    """What the GGUF tensor `name` must hold: the module's weight (dequantized), q / k rows reordered."""
    c = model.config
    for module_name, module in model.named_modules():
        stem = gguf_name(module_name)
        if stem is not None and name == f"{stem}.weight":
            w = module.dequantize_weight() if hasattr(module, "dequantize_weight") else module.weight.detach().float()
            heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(stem.rsplit(".", 1)[-1])
            return w[rotary_rows(w.shape[0], heads)] if heads else w
    raise KeyError(name)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_f32_export_holds_the_weights_and_transformers_loads_it(tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert main(["export", "tiny-llama", "--format", "gguf", "--gguf-type", "f32", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.split("(", 1)[1].rstrip().removesuffix(")"))
    assert summary["architecture"] == "llama" and summary["type"] == "f32"
    model = load_base("tiny-llama", "float32")
    tensors = _read(out)
    assert len(tensors) == 2 + 9 * model.config.num_hidden_layers  # embedding, final norm, 9 per layer (tied head)
    for name, (_, values) in tensors.items():
        assert torch.equal(values.view(_expected(model, name).shape), _expected(model, name)), name
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer("tiny-llama").encode("def f(x): return x")])
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "q5_1"])
def test_block_types_equal_the_reference_quantizer(gguf_type, tmp_path):
    out = tmp_path / "tiny.gguf"
    assert main(["export", "tiny-llama", "--format", "gguf", "--gguf-type", gguf_type, "--out", str(out)]) == 0
    model = load_base("tiny-llama", "float32")
    r = GGUFReader(str(out))
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    for t in r.tensors:
        if t.name.startswith("blk.") and "norm" not in t.name:
            assert t.tensor_type.name == gguf_type.upper()
            ref = quants.quantize(_expected(model, t.name).numpy(), t.tensor_type)
            assert np.array_equal(np.asarray(t.data), ref), t.name


def test_a_qat_run_exports_the_codes_it_trained(tmp_path, capsys):
    """qat.method=q4_0: the GGUF's q4_0 blocks dequantize to exactly the converted model's weights, and
    transformers' loader of the GGUF gives the converted model's logits."""
    run_dir = tmp_path / "run"
    assert main(["run", "qat", *TINY, "qat.method=q4_0", "train.max_steps=2", f"output_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "gguf", "--gguf-type", "q4_0"]) == 0
    summary = json.loads(capsys.readouterr().out.split("(", 1)[1].rstrip().removesuffix(")"))
    assert summary["stored_codes"] == 14 and summary["quantized_here"] == 0
    converted = load_base(str(run_dir / "final"), "float32")
    out = run_dir / "model-q4_0.gguf"
    blocks = {name: values for name, (kind, values) in _read(out).items() if kind == "Q4_0"}
    assert len(blocks) == 14
    for name, values in blocks.items():
        want = _expected(converted, name)
        assert torch.equal(values.view(want.shape), want), name
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(run_dir, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer("tiny-llama").encode("class A: pass")])
    ref = _logits(converted, ids)
    assert torch.allclose(_logits(loaded, ids), ref, atol=1e-3 * ref.abs().max())  # f16 embedding: not bitwise


def test_unknown_type_and_architecture_are_one_line(tmp_path, capsys):
    assert main(["export", "tiny-llama", "--format", "gguf", "--gguf-type", "q3_k", "--out", str(tmp_path / "x")]) == 2
    assert "--gguf-type 'q3_k' is not one of f32, f16, bf16, q8_0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("")
    assert main(["export", "tiny-llama", "--format", "gguf", "--out", str(tmp_path / "file" / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "x.gguf: cannot write it" in err and "Traceback" not in err


def test_lora_adapter_gguf_adds_up_to_the_merged_model(tmp_path, capsys):
    """--format gguf-lora: for every adapted linear, the base GGUF's weight + (alpha / rank) lora_b @ lora_a (as
    llama.cpp applies it) equals the weight of `slimtune export RUN --merge` (PEFT's merge), rows in GGUF order;
    rsLoRA's scaling is folded into alpha."""
    run_dir = tmp_path / "run"
    args = [*TINY, "train.max_steps=2", "lora.rank=4", "lora.alpha=8", "lora.use_rslora=true", "train.lr=1e-2"]
    assert main(["run", "lora", *args, f"output_dir={run_dir}"]) == 0
    assert (
        main(["export", "tiny-llama", "--format", "gguf", "--gguf-type", "f32", "--out", str(tmp_path / "b.gguf")]) == 0
    )
    assert main(["export", str(run_dir), "--format", "gguf-lora"]) == 0
    assert main(["export", str(run_dir), "--merge", "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    r = GGUFReader(str(run_dir / "adapter.gguf"))
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    assert r.fields["general.type"].contents() == "adapter" and alpha == pytest.approx(8 / 2 * 4)  # 8/sqrt(4) * 4
    lora = {t.name: torch.from_numpy(np.array(t.data)).float() for t in r.tensors}
    base, merged = _read(tmp_path / "b.gguf"), load_base(str(tmp_path / "merged"), "float32")
    assert len(lora) == 2 * 7 * merged.config.num_hidden_layers
    for name in [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape[0] == b.shape[1] == 4
        want = _expected(merged, name)
        got = base[name][1].view(want.shape) + alpha / 4 * (b @ a)
        assert torch.allclose(got, want, atol=1e-6), name
        assert not torch.allclose(base[name][1].view(want.shape), want, atol=1e-6)  # the adapter did train


def test_gguf_lora_refuses_a_full_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "full", *TINY, "train.max_steps=1", f"output_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "gguf-lora"]) == 2
    assert "--format gguf-lora exports a LoRA run's final/" in capsys.readouterr().err


def test_a_qwen2_model_with_attention_biases_round_trips(tmp_path):
    """Qwen2 (q / k / v biases; llama.cpp's qwen2 graph takes q / k rows in HF's order): every tensor the gguf
    reader returns is the model's own, biases included, under the qwen2 architecture."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SMALL, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_()  # biases that matter
    model.save_pretrained(tmp_path / "qwen")
    load_tokenizer("tiny-llama").save_pretrained(tmp_path / "qwen")
    out = tmp_path / "qwen.gguf"
    assert main(["export", str(tmp_path / "qwen"), "--format", "gguf", "--gguf-type", "f32", "--out", str(out)]) == 0
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    got = {t.name: torch.from_numpy(np.array(t.data)).float() for t in reader.tensors}
    state = dict(model.named_parameters())
    assert len(got) == len(state)  # every parameter once: 9 weights + 3 biases per layer, embedding, norm, head
    for hf_name, p in state.items():
        module, _, kind = hf_name.rpartition(".")
        assert torch.equal(got[f"{gguf_name(module)}.{kind}"].view(p.shape), p.detach()), hf_name


def _wide_llama(path):
    """A Llama whose rows are whole 256-value K blocks but for down_proj (320 wide): K types and their fallback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer("tiny-llama").save_pretrained(path)
    return path


def test_a_q4_k_qat_run_exports_its_codes_and_falls_back_where_llama_cpp_does(tmp_path, capsys):
    """qat.method=q4_k on a model with 256-wide rows (down_proj's 320 are not: q5_0, as llama.cpp's quantizer
    stores them): the GGUF's tensors dequantize to the converted model's weights, the summary counts the
    fallbacks, and transformers' GGUF loader gives the converted model's logits."""
    base, run_dir = _wide_llama(tmp_path / "wide"), tmp_path / "run"
    args = [f"model.name={base}", "model.dtype=float32", "data.source=pydoc", "train.seq_len=64", "train.batch_size=2"]
    assert main(["run", "qat", *args, "qat.method=q4_k", "train.max_steps=2", f"output_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "gguf", "--gguf-type", "q4_k"]) == 0
    summary = json.loads(capsys.readouterr().out.split("(", 1)[1].rstrip().removesuffix(")"))
    assert summary["stored_codes"] == 14 and summary["quantized_here"] == 0 and summary["fallback"] == {"q5_0": 2}
    converted = load_base(str(run_dir / "final"), "float32")
    out = run_dir / "model-q4_k.gguf"
    kinds = {}
    for name, (kind, values) in _read(out).items():
        kinds[name] = kind
        if name.startswith("blk.") and "norm" not in name:
            want = _expected(converted, name)
            assert torch.equal(values.view(want.shape), want), name
    assert kinds["blk.0.ffn_down.weight"] == "Q5_0" and kinds["blk.0.ffn_gate.weight"] == "Q4_K"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(run_dir, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer("tiny-llama").encode("class A: pass")])
    ref = _logits(converted, ids)
    assert torch.allclose(_logits(loaded, ids), ref, atol=1e-3 * ref.abs().max())  # f16 embedding: not bitwise


def test_a_phi3_model_round_trips_through_transformers(tmp_path, capsys):
    """Phi-3 / Phi-4 (fused qkv and gate_up, NeoX rotary in HF's row order): transformers' GGUF loader gives the
    model's logits (llama.cpp's too: 3e-4 on logits of 1.2, as for Llama, checked by hand with llama-cpp-python);
    a long-context rope scaling is refused in one line."""
    from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.pad_token = tokenizer.eos_token  # else transformers' GGUF loader takes Phi-3's default pad id, 32000
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})  # llama.cpp's Phi-3 needs it
    cfg = Phi3Config(**{**SMALL, "vocab_size": len(tokenizer)}, tie_word_embeddings=False, pad_token_id=2)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "phi3")
    tokenizer.save_pretrained(tmp_path / "phi3")
    out = tmp_path / "phi3.gguf"
    assert main(["export", str(tmp_path / "phi3"), "--format", "gguf", "--gguf-type", "f32", "--out", str(out)]) == 0
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "phi3"
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_qkv.weight", "blk.1.ffn_up.weight", "output.weight"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer("tiny-llama").encode("def f(x): return x")])
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)
    import shutil

    shutil.copytree(tmp_path / "phi3", tmp_path / "long")
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    factors = {"short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "original_max_position_embeddings": 128}
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 1.0, **factors}
    (tmp_path / "long" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "long"), "--format", "gguf", "--out", str(tmp_path / "long.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "rope_type=longrope" in err and "\n" not in err and not (tmp_path / "long.gguf").exists()


def test_a_sentencepiece_style_tokenizer_is_written_as_llama_cpps_llama_model(tmp_path, capsys):
    """Byte fallback + U+2581 spaces (Llama 2 / Mistral 7B / Phi-3-mini's tokenizer.json): pieces, scores (minus
    the rank of the merge that makes each piece), byte / unknown / control types and the space prefix; the
    tokenizer transformers rebuilds from the GGUF (merges derived from those scores, as llama.cpp merges) encodes
    text, bytes and runs of spaces included, to the same ids, and the model gives the same logits."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(sentencepiece_style_tokenizer(tmp_path / "spm"))
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = LlamaConfig(vocab_size=vocab, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **sizes)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "spm")
    tokenizer = load_tokenizer(str(tmp_path / "spm"))
    out = tmp_path / "spm" / "m.gguf"
    assert main(["export", str(tmp_path / "spm"), "--format", "gguf", "--gguf-type", "f32", "--out", str(out)]) == 0
    assert '"tokenizer": "llama"' in capsys.readouterr().out
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.add_space_prefix"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [2, 3, 3, 6] and types.count(6) == 256  # <unk>, <s>, </s>, <0x00> ...
    rebuilt = AutoTokenizer.from_pretrained(tmp_path / "spm", gguf_file=out.name)
    for text in list(topics.values())[-3:] + ["  two  spaces, naïve café 🚀 \t tab\n\nnew"]:
        assert rebuilt.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "spm", gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("def f(x): return x")])
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)


def test_a_gemma2_model_round_trips_through_transformers(tmp_path, capsys):
    """Gemma-2: its four norms a layer written as llama.cpp reads them (1 + w), soft caps, sliding window, key /
    value lengths: transformers' GGUF loader gives the model's logits; a query scale llama.cpp does not apply is
    refused in one line."""
    import shutil

    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    # head_dim 256 = query_pre_attn_scalar's default: transformers' GGUF loader does not read the scalar back
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 256}
    cfg = Gemma2Config(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, query_pre_attn_scalar=256, **sizes)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 2, 1, 2
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)  # norms that matter (Gemma's start at 0: 1 + w = 1)
    model.save_pretrained(tmp_path / "gemma2")
    load_tokenizer("tiny-llama").save_pretrained(tmp_path / "gemma2")
    out = tmp_path / "gemma2.gguf"
    assert main(["export", str(tmp_path / "gemma2"), "--format", "gguf", "--gguf-type", "f32", "--out", str(out)]) == 0
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "gemma2"
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= {t.name for t in reader.tensors}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer("tiny-llama").encode("def f(x): return x")])
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)
    shutil.copytree(tmp_path / "gemma2", tmp_path / "scaled")
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    (tmp_path / "scaled" / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 32}))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "scaled"), "--format", "gguf", "--out", str(tmp_path / "s.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "query_pre_attn_scalar=32" in err and "\n" not in err and not (tmp_path / "s.gguf").exists()


def test_a_tokenizer_llama_cpp_has_no_model_for_is_one_line(tmp_path, capsys):
    """A word-level tokenizer (neither byte-level BPE nor SentencePiece-style) is refused before anything is written."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "def": 3, "f": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    PreTrainedTokenizerFast(tokenizer_object=words, **specials).save_pretrained(tmp_path / "m")
    LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": 5})).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "writes BPE tokenizers" in err and "\n" not in err and not (tmp_path / "m.gguf").exists()
