"""Block-wise INT8: error within absmax/254, storage, round trips, and the linear against F.linear."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.quant.int8 import Int8Linear, Int8Weight, LinearInt8, quantize_int8


@pytest.mark.parametrize("block", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_bound(block, dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 512).to(dtype)
    w[0, :block] = 0  # an all-zero block
    q = quantize_int8(w, block)
    assert q.codes.dtype == torch.int8 and q.codes.numel() == w.numel()
    assert q.absmax.dtype == torch.float32 and q.absmax.shape == (w.numel() // block,)
    assert q.codes.abs().max() <= 127
    wq = q.dequantize()
    assert wq.shape == w.shape and torch.equal(wq[0, :block], torch.zeros(block))
    err = (wq - w.float()).abs().view(-1, block)
    assert (err <= q.absmax[:, None] / 254 + 1e-6).all()
    assert q.nbytes == w.numel() + 4 * w.numel() // block  # 8 + 32/block bits per weight


def test_exact_on_representable_values():
    torch.manual_seed(1)
    absmax = torch.tensor([2.0, 0.5])
    codes = torch.randint(-127, 128, (2, 64)).to(torch.int8)
    codes[:, 0] = 127  # the block max is exactly representable
    w = codes.float() * (absmax / 127)[:, None]
    q = quantize_int8(w, 64)
    assert torch.equal(q.codes.view(2, 64), codes)
    torch.testing.assert_close(q.dequantize(), w)


def test_tensors_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    q = quantize_int8(torch.randn(24, 96), 32)
    save_file(q.tensors(), str(tmp_path / "w.safetensors"))
    back = Int8Weight.from_tensors(load_file(str(tmp_path / "w.safetensors")), (24, 96), 32)
    assert torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="'absmax'"):
        Int8Weight.from_tensors(q.tensors(), (24, 96), 64)


def test_linear_forward_backward():
    torch.manual_seed(3)
    lin = torch.nn.Linear(128, 96)
    m = Int8Linear.from_linear(lin)
    w = m.dequantize_weight()
    assert w.shape == (96, 128) and (w - lin.weight).abs().max() <= lin.weight.abs().max() / 254 + 1e-6
    x = torch.randn(3, 5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = m(x)
    assert (96, 128) not in saved  # the dense weight is recomputed in backward, not kept
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in m.parameters())


def test_function_bias_grad():
    torch.manual_seed(4)
    q = quantize_int8(torch.randn(8, 64))
    x, b = torch.randn(3, 64, requires_grad=True), torch.randn(8, requires_grad=True)
    LinearInt8.apply(x, q, b).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((8,), 3.0))


def test_requantize_roundtrip_and_state_dict():
    torch.manual_seed(5)
    m = Int8Linear.from_linear(torch.nn.Linear(64, 32, bias=False), block_size=32, compute_dtype=torch.bfloat16)
    assert m.bias is None
    codes = m.codes.clone()
    m.requantize_(m.dequantize_weight())  # a fixed point: dequantized values are representable
    assert torch.equal(m.codes, codes)
    w2 = torch.randn(32, 64)
    m.requantize_(w2)
    torch.testing.assert_close(m.dequantize_weight(), quantize_int8(w2, 32).dequantize())
    fresh = Int8Linear(64, 32, bias=False, block_size=32, compute_dtype=torch.bfloat16)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 64)
    assert m(x).dtype == torch.float32
    torch.testing.assert_close(fresh(x), m(x))
    m.half()
    assert m.absmax.dtype == torch.float32 and torch.equal(m.dequantize_weight(), fresh.dequantize_weight())
    with pytest.raises(ValueError, match=r"weight shape \(3, 3\)"):
        m.requantize_(torch.randn(3, 3))


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"divisible.*shape \(3, 5\)"):
        quantize_int8(torch.randn(3, 5), 64)
    with pytest.raises(ValueError, match=r"shape \(5, 96\)"):
        Int8Linear.from_linear(torch.nn.Linear(96, 5))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(torch.full((64,), float("inf")))
