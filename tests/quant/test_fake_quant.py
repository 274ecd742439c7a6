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


def _lsq_reference(w, scale, zero, method):
    """LSQ written with autograd: w_hat = s * q(u) (+ z), u = w / s (or (w - z) / s), q rounding to the grid
    through a straight-through estimator that is the identity inside the grid and 0 outside (its clipping)."""
    from slimtune.quant.intk import int_qmax
    from slimtune.quant.nfk import nf_codebook

    fmt = QuantFormatSpec(method, block_size=32, double_quant=False).fmt
    blocks = w.reshape(scale.numel(), -1)
    if fmt.kind == "int_asym":
        u = (blocks - zero[:, None]) / scale[:, None]
        lo, hi = 0, int_qmax(fmt.bits, False)
    else:
        u = blocks / scale[:, None]
        lo, hi = (-1, 1) if fmt.kind == "nf" else (-int_qmax(fmt.bits, True), int_qmax(fmt.bits, True))
    uc = u.clamp(lo, hi)  # identity inside, no gradient outside
    if fmt.kind == "nf":
        book = nf_codebook(fmt.bits)
        grid = book[torch.bucketize(uc.detach(), (book[1:] + book[:-1]) / 2)]
    else:
        grid = torch.round(uc.detach())
    q = uc + (grid - uc).detach()
    out = q * scale[:, None] + (zero[:, None] if zero is not None else 0)
    return out.reshape(w.shape)


@pytest.mark.parametrize("method", ["nf3", "int4", "int3a", "nf2"])
def test_learned_scales_forward_and_gradients(method):
    """Forward: the format's packed weight coded against the scales (and what the converted PackedLinear
    computes); backward: LSQ's gradients, against the same estimator written with autograd."""
    from slimtune.quant.learned_scales import initial_scales, learned_fake_quantize, packed_with

    torch.manual_seed(0)
    spec = QuantFormatSpec(method, block_size=32, double_quant=False)
    w = (torch.randn(16, 64) * torch.linspace(0.1, 2, 64)).requires_grad_(True)
    scale, zero = initial_scales(w.detach(), spec.fmt)
    scale = (scale * torch.empty_like(scale).uniform_(0.7, 1.1)).requires_grad_(True)  # some values clip
    zero = zero.requires_grad_(True) if zero is not None else None
    out = learned_fake_quantize(w, scale, zero, spec.fmt)
    assert torch.equal(out, packed_with(w, spec.fmt, scale, zero).dequantize(torch.float32))
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [w, scale, *([zero] if zero is not None else [])])
    w2 = w.detach().clone().requires_grad_(True)
    s2 = scale.detach().clone().requires_grad_(True)
    z2 = zero.detach().clone().requires_grad_(True) if zero is not None else None
    ref = _lsq_reference(w2, s2, z2, method)
    assert torch.allclose(ref, out, atol=1e-6)
    expected = torch.autograd.grad((ref * g).sum(), [w2, s2, *([z2] if z2 is not None else [])])
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_learned_scales_beat_fixed_ones_on_a_least_squares_fit():
    """Training only the scales of a fixed INT3 weight against its full-precision output lowers the error
    below the format's own absmax scales (what EfficientQAT's scale-only phase does)."""
    from slimtune.quant.learned_scales import initial_scales, learned_fake_quantize

    torch.manual_seed(0)
    spec = QuantFormatSpec("int3", block_size=64, double_quant=False)
    w = torch.randn(32, 128)
    x = torch.randn(256, 128)
    target = x @ w.T
    scale, _ = initial_scales(w, spec.fmt)
    scale = scale.requires_grad_(True)
    opt = torch.optim.Adam([scale], lr=1e-3)

    def err():
        return ((x @ learned_fake_quantize(w, scale, None, spec.fmt).T - target) ** 2).mean()

    start = err().item()
    for _ in range(200):
        opt.zero_grad()
        err().backward()
        opt.step()
    assert err().item() < 0.9 * start
