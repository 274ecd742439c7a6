"""LoRALinear against independent references: its formula computed here, PEFT's LoraModel on the same base
and factors, torch's dropout, and each quantized format's own quantizer for merges into quantized bases."""

import copy

import pytest
import torch
import torch.nn as nn

from slimtune.adapters import apply_adapters, unwrap_adapters
from slimtune.adapters.lora import LoRALinear
from slimtune.adapters.lora import LoRAConfig
from slimtune.config import AdapterConfig
from slimtune.errors import ConfigError
from slimtune.quant import NF4Linear, PackedLinear, quantize_model, quantize_nf4, quantize_packed

# rank 4, alpha 8: LoRA scales B A by alpha / r = 2, rsLoRA by alpha / sqrt(r) = 4 (written out, not read back)
RANK, ALPHA = 4, 8.0
SCALING = {False: 2.0, True: 4.0}


def _lora(base, rank=RANK, alpha=ALPHA, dropout=0.0, use_rslora=False, seed=0):
    """A LoRALinear with a trained-looking (nonzero) B."""
    torch.manual_seed(seed)
    m = LoRALinear(base, rank, alpha, dropout, use_rslora=use_rslora)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, 0.5)
    return m


def _by_hand(x, W, b, A, B, scaling):
    """x W^T + b + scaling * x A^T B^T, in float64."""
    x, W, A, B = (t.detach().double() for t in (x, W, A, B))
    y = x @ W.T + scaling * (x @ A.T @ B.T)
    return y if b is None else y + b.detach().double()


def test_init_output_equals_base_and_b_is_zero():
    base = nn.Linear(16, 12)
    x = torch.randn(3, 5, 16)
    m = LoRALinear(base, RANK, ALPHA)
    assert torch.equal(m.lora_B.weight, torch.zeros(12, RANK)) and m.lora_A.weight.abs().sum() > 0
    assert torch.equal(m(x), base(x))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_formula(use_rslora, bias):
    base = nn.Linear(16, 12, bias=bias)
    m = _lora(base, use_rslora=use_rslora)
    assert m.scaling == SCALING[use_rslora]
    x = torch.randn(7, 16)
    ref = _by_hand(x, base.weight, base.bias, m.lora_A.weight, m.lora_B.weight, SCALING[use_rslora])
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    delta = SCALING[use_rslora] * m.lora_B.weight.detach().double() @ m.lora_A.weight.detach().double()
    torch.testing.assert_close(m.delta_weight().double(), delta, rtol=1e-6, atol=1e-6)


def test_only_the_factors_train():
    m = _lora(nn.Linear(16, 12))
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    m(torch.randn(3, 16)).square().sum().backward()
    assert m.lora_A.weight.grad is not None and m.lora_B.weight.grad is not None
    assert m.base.weight.grad is None and m.base.bias.grad is None


def test_only_adapter_params_train_and_gradients_flow():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    names = apply_adapters(model, AdapterConfig(target_modules="all-linear"), LoRAConfig(rank=2, alpha=4.0))
    assert names == ["0", "2"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"}
    model(torch.randn(3, 8)).sum().backward()
    assert model[0].lora_B.weight.grad is not None and model[0].base.weight.grad is None
    unwrap_adapters(model)
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_unmerge_on_linear(use_rslora):
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    m = _lora(base, use_rslora=use_rslora)
    A, B = m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone()
    x = torch.randn(4, 16)
    y = m(x)
    m.merge(safe=True)
    assert m.merged
    merged = w0.double() + SCALING[use_rslora] * (B.double() @ A.double())
    torch.testing.assert_close(base.weight.double(), merged, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)  # merged: the base alone gives the output
    torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    assert not m.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)  # fp32 add then subtract
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_safe_merge_rejects_nan():
    m = _lora(nn.Linear(8, 8))
    with torch.no_grad():
        m.lora_B.weight[0, 0] = float("nan")
    w0 = m.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        m.merge(safe=True)
    assert torch.equal(m.base.weight, w0) and not m.merged


def _nf4_base():
    torch.manual_seed(1)
    base = NF4Linear.from_linear(nn.Linear(64, 32))
    return base, (lambda w: quantize_nf4(w, 64, True).dequantize())  # NF4's own quantizer, QLoRA's settings


def _nf3_base():
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Linear(64, 32))
    assert quantize_model(seq, "nf3") == 1
    base = seq[0]
    assert isinstance(base, PackedLinear) and base.fmt.name.startswith("nf3")
    return base, (lambda w: quantize_packed(w, base.fmt).dequantize())  # the bit-packed format's quantizer


@pytest.mark.parametrize("make_base", [_nf4_base, _nf3_base], ids=["nf4", "nf3_packed"])
def test_merge_into_quantized_base_requantizes_and_unmerge_restores_exact_codes(make_base):
    base, quantize = make_base()
    before = {k: v.clone() for k, v in base.named_buffers()}
    deq = base.dequantize_weight(torch.float32)
    m = _lora(base, rank=8, alpha=16.0)  # scaling 2
    A, B = m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone()
    x = torch.randn(5, 64)
    y = m(x)
    ref = _by_hand(x, deq, base.bias, A, B, 2.0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)

    m.merge()
    merged = base.dequantize_weight(torch.float32)
    expected = quantize(deq + (B @ A) * 2.0)  # dequant(Q) + delta, quantized by the format's own code
    assert torch.equal(merged, expected)
    assert not torch.equal(merged, deq)  # the delta did change the codes
    assert {k: (v.shape, v.dtype) for k, v in base.named_buffers()} == {
        k: (v.shape, v.dtype) for k, v in before.items()
    }
    # merged forward: the base alone, x W'^T + b with W' the re-quantized weight
    torch.testing.assert_close(m(x).double(), _by_hand(x, expected, base.bias, A, 0 * B, 0.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()

    m.unmerge()
    after = dict(base.named_buffers())
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert torch.equal(m(x), y)


@pytest.mark.parametrize("method", ["nf4", "int8"])  # bnb Linear4bit / Linear8bitLt (both nn.Linear subclasses)
def test_bnb_base_refuses_in_place_merge(method):
    pytest.importorskip("bitsandbytes")
    from slimtune.quant.bnb import dequantize_bnb_weight, to_bnb_linear

    torch.manual_seed(3)
    base = to_bnb_linear(nn.Linear(64, 32), method)
    codes, w0 = base.weight.data.clone(), dequantize_bnb_weight(base).clone()
    m = _lora(base)
    with pytest.raises(NotImplementedError, match="export"):
        m.merge()
    assert not m.merged and torch.equal(base.weight.data, codes) and torch.equal(dequantize_bnb_weight(base), w0)


class _Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 12)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_output_and_merge_as_peft(use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    theirs = _Proj()
    ours = _lora(copy.deepcopy(theirs.proj), use_rslora=use_rslora)
    cfg = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, bias="none", use_rslora=use_rslora
    )
    pm = peft.get_peft_model(theirs, cfg)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert layer.scaling["default"] == SCALING[use_rslora]
    x = torch.randn(6, 16)
    pm.eval()
    torch.testing.assert_close(ours(x), pm(x), rtol=1e-6, atol=1e-6)
    ours.merge()
    merged = pm.merge_and_unload()
    torch.testing.assert_close(ours.base.weight, merged.proj.weight, rtol=0, atol=1e-6)


def test_bad_targets_and_impossible_rank():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="matches no linear module; available"):
        apply_adapters(model, AdapterConfig(target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="lora.rank=64"):
        apply_adapters(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(target_modules="all-linear"), LoRAConfig(rank=64))


def test_dropout_only_on_the_adapter_input_and_only_in_training():
    m = _lora(nn.Linear(16, 16), dropout=0.5)
    W, b, A, B = m.base.weight, m.base.bias, m.lora_A.weight, m.lora_B.weight
    x = torch.randn(4, 16)
    m.eval()  # no dropout: the formula
    torch.testing.assert_close(m(x).double(), _by_hand(x, W, b, A, B, 2.0), rtol=1e-5, atol=1e-5)
    m.train()  # base(x) + scaling * B A dropout(x), with torch's dropout mask drawn from the same seed
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)
    xd = nn.functional.dropout(x, 0.5, training=True)
    assert (xd == 0).any() and (xd != 0).any()
    ref = (
        x.double() @ W.detach().double().T
        + b.detach().double()
        + 2.0 * (xd.double() @ A.detach().double().T @ B.detach().double().T)
    )
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, m.eval()(x))
