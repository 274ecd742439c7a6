"""NF-k: codebook vs QLoRA / bitsandbytes, nearest-code quantization, and NF4 through the packed path."""

import pytest
import torch

from slimtune.quant.nf4 import NF4_CODEBOOK, quantize_nf4
from slimtune.quant.nfk import nf_codebook
from slimtune.quant.packed import QuantFormat, quantize
from slimtune.quant.packing import unpack_bits


def test_nf4_codebook_matches_qlora_and_bnb():
    assert torch.equal(nf_codebook(4), NF4_CODEBOOK)  # bit-identical, not only to 1e-6
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.allclose(nf_codebook(4), bnbf.get_4bit_type("nf4", device="cpu").float(), rtol=0, atol=1e-6)


def test_nf4_codebook_matches_bnb_create_normal_map():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    pytest.importorskip("scipy")
    ref = bnbf.create_normal_map()  # 256 entries: the 16 NF4 values and zero padding
    ref = torch.cat([ref[ref != 0], torch.zeros(1)]).sort().values
    assert torch.allclose(nf_codebook(4), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
def test_codebook_shape(bits):
    cb = nf_codebook(bits)
    assert cb.dtype == torch.float32 and cb.shape == (2**bits,)
    assert (cb[1:] > cb[:-1]).all()
    assert cb[0] == -1 and cb[-1] == 1 and (cb == 0).sum() == 1
    # QLoRA's asymmetry: one more positive value than negative ones
    assert (cb > 0).sum() == 2 ** (bits - 1) and (cb < 0).sum() == 2 ** (bits - 1) - 1


def test_codebook_is_normal_quantiles():
    # independent float64 check of the construction for k = 3: positives are N(0,1) quantiles at
    # linspace(offset, 0.5, 5)[:-1], offset = 1 - (1/14 + 1/16) / 2, divided by the largest
    offset = 1 - 0.5 * (1 / 14 + 1 / 16)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 5, dtype=torch.float64)[:-1])
    assert torch.allclose(nf_codebook(3)[4:].double(), (pos / pos.max()).flip(0), rtol=0, atol=1e-6)


def test_unsupported_bits():
    for bits in (1, 9):
        with pytest.raises(ValueError, match="2..8"):
            nf_codebook(bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("block", [32, 64, 256])
def test_quantization_picks_nearest_code(bits, block):
    torch.manual_seed(bits)
    w = torch.randn(16, 512) * 0.05
    w[0, :block] = 0.0  # an all-zero block maps to the code of 0.0
    packed = quantize(w, QuantFormat("nf", bits, block))
    codes = unpack_bits(packed.codes, bits, w.numel()).long()
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = (blocks / absmax.clamp_min(1e-30)).flatten()
    cb = nf_codebook(bits)
    dist = (scaled[:, None] - cb[None, :]).abs()  # brute force over all 2**bits codes
    assert torch.allclose(dist.gather(1, codes[:, None]).squeeze(1), dist.min(dim=1).values, rtol=0, atol=1e-6)
    assert (codes.view(-1, block)[0] == int((cb == 0).nonzero())).all()
    assert torch.equal(packed.scale, absmax.squeeze(1))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(96, 64), (9, 64 * 7), (256, 576)])
def test_nf4_packed_equals_quantize_nf4(shape, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    ref = quantize_nf4(w, 64, double_quant=double_quant)
    ours = quantize(w, QuantFormat("nf", 4, 64, double_quant))
    assert torch.equal(ours.codes, ref.codes)
    assert torch.equal(ours.dequantize(), ref.dequantize())
    assert torch.equal(ours.dequantize(torch.bfloat16), ref.dequantize(torch.bfloat16))
    if double_quant:
        assert torch.equal(ours.scale_q, ref.absmax_q) and torch.equal(ours.scale_scale, ref.absmax_scale)
        assert torch.equal(ours.scale_offset, ref.absmax_offset)
    else:
        assert torch.equal(ours.scale, ref.absmax)
    assert ours.nbytes == ref.nbytes
