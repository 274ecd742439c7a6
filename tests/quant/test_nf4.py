"""slimtune NF4 vs QLoRA's published codebook and bitsandbytes' quantizer, plus the format's bounds."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.quant.nf4 import NF4_CODEBOOK, NF4Linear, dequantize_nf4, quantize_nf4, unpack_codes

# QLoRA paper, appendix E (NF4 data type values)
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_codebook_matches_qlora_and_bnb():
    assert NF4_CODEBOOK.tolist() == QLORA_NF4
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.testing.assert_close(bnbf.get_4bit_type("nf4", device="cpu").float(), NF4_CODEBOOK)


@pytest.mark.parametrize("shape", [(96, 64), (9, 448), (256, 576)])
def test_matches_bitsandbytes(shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    ours = quantize_nf4(w, 64, double_quant=False)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert (q.flatten() == ours["codes"]).float().mean() >= 0.999
    torch.testing.assert_close(ours["absmax"], state.absmax.float())
    ref = bnbf.dequantize_4bit(q, state)
    torch.testing.assert_close(dequantize_nf4(ours, shape, 64), ref, rtol=0, atol=1e-6)


def test_pack_unpack_roundtrip_exact():
    codes = torch.randint(0, 16, (128,), dtype=torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    assert torch.equal(unpack_codes(packed), codes)
    assert packed.numel() == 64  # 4 bits per code


@pytest.mark.parametrize("block", [32, 64, 128])
def test_error_within_format_bound(block):
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    t = quantize_nf4(w, block, double_quant=False)
    err = (dequantize_nf4(t, w.shape, block) - w).abs().view(-1, block)
    half_gap = (NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max() / 2  # nearest-value rounding
    assert (err <= t["absmax"][:, None] * half_gap + 1e-6).all()


def test_double_quant_scales_and_size():
    torch.manual_seed(2)
    w = torch.randn(512, 512)
    plain, dq = quantize_nf4(w, 64, False), quantize_nf4(w, 64, True)
    from slimtune.quant.nf4 import dequantize_scales

    absmax = plain["absmax"]
    bound = (absmax - absmax.mean()).abs().max() / 127 / 2 + 1e-6  # half an int8 step of the 256-block scale
    assert (dequantize_scales(dq) - absmax).abs().max() <= bound
    size = lambda t: sum(v.numel() * v.element_size() for v in t.values())  # noqa: E731
    assert size(dq) < size(plain)
    assert abs(size(dq) * 8 / w.numel() - (4 + 8 / 64)) < 0.01  # ~4.127 bits per weight


def test_linear_forward_backward_match_reference():
    torch.manual_seed(3)
    lin = torch.nn.Linear(128, 72)
    m = NF4Linear.from_linear(lin)
    w = m.dequantize_weight()
    x = torch.randn(5, 7, 128, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in m.parameters())


def test_requantize_and_bad_shapes():
    lin = torch.nn.Linear(64, 64)
    m = NF4Linear.from_linear(lin)
    w2 = torch.randn(64, 64)
    m.requantize_(w2)
    torch.testing.assert_close(m.dequantize_weight(), dequantize_nf4(quantize_nf4(w2), (64, 64), 64))
    with pytest.raises(ValueError, match=r"weight shape \(3, 3\)"):
        m.requantize_(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"shape \(3, 10\)"):
        quantize_nf4(torch.randn(3, 10), 64)
    with pytest.raises(ValueError, match="even"):
        NF4Linear(64, 64, block_size=33)


def test_lora_merge_into_nf4_requantizes():
    from slimtune.adapters.lora import LoRALinear

    torch.manual_seed(4)
    base = NF4Linear.from_linear(torch.nn.Linear(128, 128))
    m = LoRALinear(base, 8, 16.0)
    torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(4, 128)
    y = m(x)
    expected_w = dequantize_nf4(quantize_nf4(base.dequantize_weight() + m.delta_weight()), (128, 128), 64)
    m.merge()
    torch.testing.assert_close(base.dequantize_weight(), expected_w)
    assert (m(x) - y).abs().max() < 0.1 * y.abs().max()  # lossy but close: re-quantized explicitly
