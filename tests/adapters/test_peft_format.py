"""slimtune's LoRA saved in PEFT's format loads in `peft.PeftModel` and gives the same logits."""

import pytest
import torch

from slimtune.adapters import adapter_modules, apply_adapters
from slimtune.adapters.peft_format import load_peft_adapter, save_peft_adapter
from slimtune.config import AdapterConfig
from slimtune.errors import SlimtuneError
from slimtune.models import load_model

peft = pytest.importorskip("peft")


def _trained_lora_model(targets):
    model = load_model("tiny-llama")
    cfg = AdapterConfig(rank=4, alpha=16.0, target_modules=targets)
    apply_adapters(model, cfg)
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
