"""slimtune's LoRA saved in PEFT's format loads in `peft.PeftModel` and gives the same logits."""

import pytest
import torch

from slimtune.adapters import adapter_modules, apply_adapters
from slimtune.formats.peft import load_peft_adapter, save_peft_adapter
from slimtune.adapters.lora import LoRAConfig
from slimtune.config import AdapterConfig
from slimtune.errors import SlimtuneError
from slimtune.formats.hf import load_model

peft = pytest.importorskip("peft")


def _trained_lora_model(targets):
    model = load_model("tiny-llama")
    cfg = LoRAConfig(rank=4, alpha=16.0)
    apply_adapters(model, AdapterConfig(target_modules=targets), cfg)
    torch.manual_seed(1)
    for m in adapter_modules(model).values():  # B != 0, as after training
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model.eval(), cfg


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
def test_peft_loads_our_adapter_with_same_logits(tmp_path, tiny_model_dir, targets):
    model, cfg = _trained_lora_model(targets)
    save_peft_adapter(model, cfg, tmp_path / "adapter", "tiny-llama", str(tiny_model_dir))
    x = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        ours = model(input_ids=x).logits
        base = load_model("tiny-llama").eval()
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(input_ids=x).logits
        plain = load_model("tiny-llama").eval()(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter really changes the output


def test_roundtrip_through_slimtune_loader(tmp_path, tiny_model_dir):
    model, cfg = _trained_lora_model("all-linear")
    save_peft_adapter(model, cfg, tmp_path / "a", "tiny-llama", str(tiny_model_dir))
    other = load_model("tiny-llama").eval()
    load_peft_adapter(other, tmp_path / "a")
    x = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=x).logits, model(input_ids=x).logits)


def test_corrupted_adapter_is_a_clear_error(tmp_path, tiny_model_dir):
    model, cfg = _trained_lora_model("all-linear")
    save_peft_adapter(model, cfg, tmp_path / "a", "tiny-llama", str(tiny_model_dir))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SlimtuneError, match="corrupted"):
        load_peft_adapter(load_model("tiny-llama"), tmp_path / "a")


def _peft_adapter(tmp_path, **lora_kwargs):
    """A PEFT-trained-looking adapter (random B) on tiny-llama saved by PEFT itself; returns its dir and
    PEFT's logits on a fixed input."""
    torch.manual_seed(0)
    base = load_model("tiny-llama").eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, **lora_kwargs)
    pm = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm.eval()(input_ids=x).logits
    return tmp_path / "peft", x, want


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"], "use_rslora": True},
        {
            "target_modules": ["q_proj", "up_proj", "o_proj"],
            "rank_pattern": {"up_proj": 2, "layers.1.self_attn.q_proj": 8},
            "alpha_pattern": {"o_proj": 3},
        },
        {"target_modules": "model.layers.0.*(q_proj|down_proj)", "modules_to_save": ["lm_head"]},
    ],
)
def test_slimtune_loads_peft_adapters_with_its_options(tmp_path, kwargs):
    """use_rslora, rank_pattern, alpha_pattern, regex target_modules and modules_to_save all change the
    model; slimtune's loader must give PEFT's own logits."""
    path, x, want = _peft_adapter(tmp_path, **kwargs)
    model = load_model("tiny-llama").eval()
    load_peft_adapter(model, path)
    with torch.no_grad():
        got = model(input_ids=x).logits
        plain = load_model("tiny-llama").eval()(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"target_modules": ["q_proj"], "lora_bias": True}, "lora_bias=True is not supported"),
        ({"target_modules": ["q_proj"], "bias": "lora_only"}, "bias='lora_only'"),
    ],
)
def test_options_slimtune_cannot_load_are_refused(tmp_path, kwargs, needle):
    path, _, _ = _peft_adapter(tmp_path, **kwargs)
    with pytest.raises(SlimtuneError, match=needle):
        load_peft_adapter(load_model("tiny-llama"), path)


def test_unexpected_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, _ = _peft_adapter(tmp_path, target_modules=["q_proj"])
    state = load_file(str(path / "adapter_model.safetensors"))
    state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(SlimtuneError, match="belongs to no LoRA module"):
        load_peft_adapter(load_model("tiny-llama"), path)
