"""Block-wise INT8: round trip within absmax/254 and the linear against F.linear."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.quant.int8 import Int8Linear, dequantize_int8, quantize_int8


@pytest.mark.parametrize("block", [32, 64, 256])
def test_error_bound(block):
    torch.manual_seed(0)
    w = torch.randn(64, 512)
    t = quantize_int8(w, block)
    assert t["codes"].dtype == torch.int8 and t["codes"].numel() == w.numel()
    err = (dequantize_int8(t, w.shape, block) - w).abs().view(-1, block)
    assert (err <= t["absmax"][:, None] / 254 + 1e-6).all()


def test_exact_on_representable_values():
    absmax = torch.tensor([2.0, 0.5])
    codes = torch.randint(-127, 128, (2, 64)).to(torch.int8)
    w = codes.float() * (absmax / 127)[:, None]
    w[:, 0] = absmax  # make the block max exactly representable
    t = quantize_int8(w, 64)
    torch.testing.assert_close(dequantize_int8(t, w.shape, 64), w)


def test_linear_forward_backward():
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 96)
    m = Int8Linear.from_linear(lin)
    w = m.dequantize_weight()
    assert (w - lin.weight).abs().max() < lin.weight.abs().max() / 100
    x = torch.randn(3, 128, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 96) @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        quantize_int8(torch.randn(3, 5), 64)
