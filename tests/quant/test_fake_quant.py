"""Fake quantization (quant/fake.py): its forward is bit for bit the real format's quantize -> dequantize (the
module `slimtune quantize` builds), for every registered format; its gradient is the identity (STE); a model
trained against it keeps the converted model's outputs equal to the fake-quantized ones."""

import pytest
import torch
from torch import nn

from slimtune.quant import quantize_model
from slimtune.quant.fake import FakeQuantLinear, QuantFormatSpec, fake_quantize
from slimtune.registry import QUANT_FORMATS

METHODS = [m for m in QUANT_FORMATS if m not in ("none", "lq_lora")]


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, 256))  # columns of different scales
    return lin


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_is_the_real_formats_round_trip(method, double_quant):
    lin = _linear()
    spec = QuantFormatSpec(method, block_size=64, double_quant=double_quant)
    real = spec.cls.quantize_linear(lin, spec.fmt)
    assert torch.equal(fake_quantize(lin.weight, spec), real.dequantize_weight(torch.float32))
    x = torch.randn(5, 256)
    fake = FakeQuantLinear.from_linear(lin, spec)
    assert torch.equal(fake(x), nn.functional.linear(x, real.dequantize_weight(torch.float32), lin.bias))


@pytest.mark.parametrize("method", ["nf4", "int4", "int3a", "int8"])
def test_gradient_passes_straight_through(method):
    lin = _linear(1)
    spec = QuantFormatSpec(method)
    w = lin.weight.detach().clone().requires_grad_(True)
    g = torch.randn_like(w)
    (fake_quantize(w, spec) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_qat_model_converts_to_the_quantized_model_it_was_trained_against():
    """Train a tiny MLP with fake-quantized INT3 weights; quantize_model on the trained weights (the convert
    step) gives the fake-quantized model's outputs exactly, and QAT's loss ends below round-to-nearest PTQ's
    of the same training run without fake quantization."""
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    target = torch.tanh(x @ torch.randn(64, 64) * 0.5) @ torch.randn(64, 8)
    spec = QuantFormatSpec("int3", block_size=32)

    def train(qat: bool) -> nn.Sequential:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
        if qat:
            model[0], model[2] = (FakeQuantLinear.from_linear(model[i], spec) for i in (0, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
        return model

    def convert(model: nn.Sequential) -> nn.Sequential:
        plain = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
        plain.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        quantize_model(plain, "int3", block_size=32, skip_modules=())
        return plain

    qat, plain = train(qat=True), train(qat=False)
    with torch.no_grad():
        converted = convert(qat)
        assert torch.equal(converted(x), qat(x))  # the convert step loses nothing
        qat_loss = nn.functional.mse_loss(converted(x), target).item()
        ptq_loss = nn.functional.mse_loss(convert(plain)(x), target).item()
    assert qat_loss < ptq_loss, (qat_loss, ptq_loss)
