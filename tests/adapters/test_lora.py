"""LoRALinear against its formula and PEFT's invariants: init == base, merge/unmerge == base + delta."""

import pytest
import torch
import torch.nn as nn

from slimtune.adapters import apply_adapters, unwrap_adapters
from slimtune.adapters.lora import LoRALinear
from slimtune.config import AdapterConfig
from slimtune.errors import ConfigError


def _lora(base, rank=4, alpha=8.0, dropout=0.0):
    torch.manual_seed(0)
    m = LoRALinear(base, rank, alpha, dropout)
    nn.init.normal_(m.lora_B.weight)  # a trained-looking adapter
    return m


def test_init_output_equals_base():
    base = nn.Linear(16, 12)
    x = torch.randn(3, 5, 16)
    m = LoRALinear(base, 4, 8.0)
    torch.testing.assert_close(m(x), base(x), rtol=0, atol=0)


def test_forward_matches_formula_and_delta():
    base = nn.Linear(16, 12)
    m = _lora(base)
    x = torch.randn(7, 16)
    ref = x @ base.weight.T + base.bias + (x @ m.lora_A.weight.T @ m.lora_B.weight.T) * (8.0 / 4)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.delta_weight(), m.lora_B.weight @ m.lora_A.weight * 2.0)


def test_merge_unmerge_roundtrip():
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    m = _lora(base)
    x = torch.randn(4, 16)
    y = m(x)
    m.merge(safe=True)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_safe_merge_rejects_nan():
    m = _lora(nn.Linear(8, 8))
    with torch.no_grad():
        m.lora_B.weight[0, 0] = float("nan")
    w0 = m.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        m.merge(safe=True)
    assert torch.equal(m.base.weight, w0) and not m.merged


def test_only_adapter_params_train_and_gradients_flow():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = AdapterConfig(rank=2, alpha=4.0, target_modules="all-linear")
    names = apply_adapters(model, cfg)
    assert names == ["0", "2"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"}
    model(torch.randn(3, 8)).sum().backward()
    assert model[0].lora_B.weight.grad is not None and model[0].base.weight.grad is None
    unwrap_adapters(model)
    assert isinstance(model[0], nn.Linear)


def test_bad_targets_and_impossible_rank():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="matches no linear module; available"):
        apply_adapters(model, AdapterConfig(target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="adapter.rank=64"):
        apply_adapters(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(rank=64, target_modules="all-linear"))


def test_dropout_only_in_training():
    m = _lora(nn.Linear(16, 16), dropout=0.5)
    x = torch.randn(4, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))
