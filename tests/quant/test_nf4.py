"""slimtune NF4 vs QLoRA's published codebook and bitsandbytes' quantizer, plus the format's bounds."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.quant.nf4 import (
    DQ_BLOCK,
    NF4_CODEBOOK,
    LinearNF4,
    NF4Linear,
    NF4Weight,
    pack_codes,
    quantize_nf4,
    unpack_codes,
)

# QLoRA paper, appendix E (NF4 data type values)
QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
MAX_HALF_GAP = float((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max() / 2)  # nearest-value rounding bound


def test_codebook_matches_qlora_and_bnb():
    assert NF4_CODEBOOK.dtype == torch.float32 and NF4_CODEBOOK.tolist() == QLORA_NF4
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu").float(), NF4_CODEBOOK)


@pytest.mark.parametrize("shape", [(96, 64), (9, 64 * 7), (3, 128), (256, 576)])
def test_matches_bitsandbytes(shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    ours = quantize_nf4(w, 64, double_quant=False)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(ours.absmax, state.absmax.float())
    assert (q.flatten() == ours.codes).float().mean() >= 0.999  # ties could round differently (none seen)
    ref = bnbf.dequantize_4bit(q, state)
    diff = (ours.dequantize() - ref).abs()
    assert diff.max() <= ours.absmax.max() * 2 * MAX_HALF_GAP  # at worst one code apart
    assert torch.quantile(diff.flatten(), 0.999) <= 1e-6  # and equal almost everywhere


def test_ties_round_like_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    mids = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2  # exactly between two codes
    w = torch.cat([mids, torch.ones(1), -mids, -torch.ones(1), torch.zeros(32)]).reshape(1, 64)
    q, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(quantize_nf4(w, 64, double_quant=False).codes, q.flatten())


def test_pack_unpack_roundtrip_exact():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (128,), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 64  # 4 bits per code
    assert torch.equal(unpack_codes(packed), codes)
    assert torch.equal(packed[:1], (codes[0] << 4 | codes[1]).reshape(1))  # first value in the high nibble (bnb)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_error_within_format_bound(block):
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    w[0, :block] = 0.0  # an all-zero block
    w[1, :block] = 0.37  # a constant block: exact
    q = quantize_nf4(w, block, double_quant=False)
    assert q.codes.numel() == w.numel() // 2 and q.absmax.shape == (w.numel() // block,)
    wq = q.dequantize()
    assert wq.shape == w.shape and torch.isfinite(wq).all()
    err = (wq - w).abs().view(-1, block)
    assert (err <= q.absmax[:, None] * MAX_HALF_GAP + 1e-6).all()
    assert torch.equal(wq[0, :block], torch.zeros(block)) and torch.allclose(wq[1, :block], w[1, :block])


def test_double_quant_scales_and_size():
    torch.manual_seed(2)
    w = torch.randn(512, 512) * 0.02
    plain, dq = quantize_nf4(w, 64, double_quant=False), quantize_nf4(w, 64, double_quant=True)
    assert dq.double_quant and torch.equal(dq.codes, plain.codes)
    assert dq.absmax_q.dtype == torch.int8 and dq.absmax_scale.numel() == -(-plain.absmax.numel() // DQ_BLOCK)
    # each scale is off by at most half an int8 step of its 256-block's range
    centered = (plain.absmax - plain.absmax.mean()).view(-1, DQ_BLOCK)
    bound = centered.abs().amax(dim=1, keepdim=True) / 254 + 1e-7
    assert ((dq.block_absmax() - plain.absmax).view(-1, DQ_BLOCK).abs() <= bound).all()
    assert dq.nbytes < plain.nbytes
    assert abs(plain.nbytes * 8 / w.numel() - 4.5) < 1e-9
    assert abs(dq.nbytes * 8 / w.numel() - 4.127) < 0.01  # 4 + 8/64 + 32/(64*256) (+ offset)


def test_tensors_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(3)
    w = torch.randn(48, 128)
    for dq in (False, True):
        q = quantize_nf4(w, 64, double_quant=dq)
        save_file(q.tensors(), str(tmp_path / "w.safetensors"))
        back = NF4Weight.from_tensors(load_file(str(tmp_path / "w.safetensors")), (48, 128), 64)
        assert back.double_quant == dq and torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match=r"'codes'.*\(48, 64\)"):
        NF4Weight.from_tensors(q.tensors(), (48, 64), 64)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_forward_backward_match_reference(double_quant):
    torch.manual_seed(4)
    lin = torch.nn.Linear(128, 72)
    m = NF4Linear.from_linear(lin, double_quant=double_quant)
    w = m.dequantize_weight()
    assert w.shape == (72, 128) and w.dtype == torch.float32
    x = torch.randn(5, 7, 128, requires_grad=True)
    saved = []  # every tensor autograd keeps for backward
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = m(x)
    assert y.shape == (5, 7, 72) and y.dtype == x.dtype
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    assert (72, 128) not in saved  # no dense weight kept alive between forward and backward
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in m.parameters()) and m.bias.grad is None
    assert all(b.grad is None for b in m.buffers())


def test_function_gives_bias_grad_only_when_asked():
    torch.manual_seed(5)
    q = quantize_nf4(torch.randn(8, 64))
    x, b = torch.randn(3, 64, requires_grad=True), torch.randn(8, requires_grad=True)
    LinearNF4.apply(x, q, b).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((8,), 3.0))
    torch.testing.assert_close(x.grad, torch.ones(3, 8) @ q.dequantize())


def test_compute_dtype_and_autocast():
    torch.manual_seed(6)
    lin = torch.nn.Linear(64, 32)
    m = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    y = m(x)
    assert y.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
    ref = F.linear(x, m.dequantize_weight(), lin.bias)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert NF4Linear.from_linear(lin)(x).dtype == torch.bfloat16  # like nn.Linear under autocast


def test_requantize_roundtrip_and_state_dict():
    torch.manual_seed(7)
    m = NF4Linear.from_linear(torch.nn.Linear(64, 64), double_quant=False)
    codes, absmax = m.codes.clone(), m.absmax.clone()
    m.requantize_(m.dequantize_weight())  # dequantized values are exactly representable: a fixed point
    assert torch.equal(m.codes, codes) and torch.equal(m.absmax, absmax)
    w2 = torch.randn(64, 64)
    keys = list(m.state_dict())
    m.requantize_(w2)
    assert list(m.state_dict()) == keys
    torch.testing.assert_close(m.dequantize_weight(), quantize_nf4(w2, 64, double_quant=False).dequantize())
    fresh = NF4Linear(64, 64, double_quant=False)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 64)
    torch.testing.assert_close(fresh(x), m(x))
    with pytest.raises(ValueError, match=r"weight shape \(3, 3\)"):
        m.requantize_(torch.randn(3, 3))


def test_dtype_casts_move_but_never_round_scales():
    torch.manual_seed(8)
    m = NF4Linear.from_linear(torch.nn.Linear(128, 64))
    w = m.dequantize_weight()
    m.to(torch.bfloat16)
    assert m.absmax_scale.dtype == torch.float32 and m.absmax_offset.dtype == torch.float32
    assert torch.equal(m.dequantize_weight(), w)


@pytest.mark.parametrize("shape", [(9, 64 * 7), (3, 128)])
def test_ragged_shapes(shape):
    torch.manual_seed(9)
    lin = torch.nn.Linear(shape[1], shape[0])
    m = NF4Linear.from_linear(lin)
    x = torch.randn(2, shape[1])
    torch.testing.assert_close(m(x), F.linear(x, m.dequantize_weight(), lin.bias), rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_values():
    with pytest.raises(ValueError, match=r"shape \(3, 10\)"):
        quantize_nf4(torch.randn(3, 10), 64)
    with pytest.raises(ValueError, match=r"shape \(5, 96\)"):
        NF4Linear.from_linear(torch.nn.Linear(96, 5))
    with pytest.raises(ValueError, match="even"):
        NF4Linear(64, 64, block_size=33)
    with pytest.raises(ValueError, match="even"):
        quantize_nf4(torch.randn(4, 66), 33)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(torch.tensor([float("nan")] * 64))


def test_lora_merge_into_nf4_requantizes():
    from slimtune.adapters.lora import LoRALinear

    torch.manual_seed(10)
    base = NF4Linear.from_linear(torch.nn.Linear(128, 128))
    m = LoRALinear(base, 8, 16.0)
    torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(4, 128)
    y = m(x)
    expected = quantize_nf4(base.dequantize_weight() + m.delta_weight()).dequantize()
    m.merge()
    torch.testing.assert_close(base.dequantize_weight(), expected)
    y_merged = m(x)
    torch.testing.assert_close(y_merged, F.linear(x, expected, base.bias), rtol=1e-5, atol=1e-5)
    # lossy but close: re-quantizing costs NF4's ~10% relative weight error once more
    assert (y_merged - y).norm() / y.norm() < 0.15
