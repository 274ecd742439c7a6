"""INT-k symmetric / asymmetric codes: grids, nearest level (brute force), edge blocks, INT8 cross-check."""

import pytest
import torch

from slimtune.quant.int8 import quantize_int8
from slimtune.quant.intk import int_qmax
from slimtune.quant.packed import QuantFormat, quantize
from slimtune.quant.packing import unpack_bits


def codes_of(packed) -> torch.Tensor:
    return unpack_bits(packed.codes, packed.fmt.bits, packed.dequantize().numel()).long()


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_grid_and_nearest_level(bits):
    torch.manual_seed(bits)
    block, qmax = 64, 2 ** (bits - 1) - 1
    w = torch.randn(32, 256)
    packed = quantize(w, QuantFormat("int", bits, block))
    codes = codes_of(packed).view(-1, block)
    absmax = w.reshape(-1, block).abs().amax(dim=1)
    assert torch.allclose(packed.scale, absmax / qmax, rtol=1e-6, atol=0)
    assert codes.max() <= 2 * qmax  # 2**bits - 1 levels; the top code is unused
    # level j - qmax for code j: symmetric about 0, the largest |w| of each block lands on +-absmax
    levels = (torch.arange(2 * qmax + 1) - qmax).float()
    grid = levels[None, :] * packed.scale[:, None]  # (nb, 2*qmax+1)
    assert torch.allclose(grid[:, 0], -grid[:, -1]) and (grid[:, qmax] == 0).all()
    dq = packed.dequantize().view(-1, block)
    assert torch.allclose(dq, grid.gather(1, codes), rtol=0, atol=1e-6)
    extreme = w.reshape(-1, block).abs().argmax(dim=1, keepdim=True)
    assert torch.allclose(dq.gather(1, extreme).abs().squeeze(1), absmax, rtol=1e-6, atol=0)
    # nearest level, by brute force over the whole grid of each block
    blocks = w.reshape(-1, block)
    dist = (blocks[:, :, None] - grid[:, None, :]).abs()
    assert torch.allclose((blocks - dq).abs(), dist.min(dim=2).values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", range(2, 9))
def test_asymmetric_grid_and_nearest_level(bits):
    torch.manual_seed(10 + bits)
    block, top = 32, 2**bits - 1
    w = torch.randn(16, 256) * 0.1 + 0.05  # off-centre, where the asymmetric grid pays off
    packed = quantize(w, QuantFormat("int_asym", bits, block))
    codes = codes_of(packed).view(-1, block)
    blocks = w.reshape(-1, block)
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    assert torch.equal(packed.zero, lo)
    assert torch.allclose(packed.scale, (hi - lo) / top, rtol=1e-6, atol=0)
    # the block min is code 0 (exact), the block max the top code
    assert torch.equal(codes.gather(1, blocks.argmin(dim=1, keepdim=True)).squeeze(1), torch.zeros(len(lo)).long())
    assert (codes.gather(1, blocks.argmax(dim=1, keepdim=True)) == top).all()
    dq = packed.dequantize().view(-1, block)
    assert torch.equal(dq.gather(1, blocks.argmin(dim=1, keepdim=True)).squeeze(1), lo)
    grid = lo[:, None] + torch.arange(top + 1).float()[None, :] * packed.scale[:, None]
    dist = (blocks[:, :, None] - grid[:, None, :]).abs()
    assert torch.allclose((blocks - dq).abs(), dist.min(dim=2).values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["int", "int_asym"])
def test_zero_and_constant_blocks_are_exact(kind):
    w = torch.randn(4, 64)
    w[0] = 0.0
    w[1] = -0.375
    w[2, :32] = 2.5
    packed = quantize(w, QuantFormat(kind, 3, 32))
    dq = packed.dequantize()
    assert (dq[0] == 0).all()
    if kind == "int_asym":  # a constant block is exact: zero == the value, scale 0
        assert torch.equal(dq[1], w[1]) and torch.equal(dq[2, :32], w[2, :32])
    else:  # symmetric: +-absmax are grid points (up to the fp32 rounding of absmax / qmax * qmax)
        assert torch.allclose(dq[1], w[1], rtol=1e-6, atol=0)
        assert torch.allclose(dq[2, :32], w[2, :32], rtol=1e-6, atol=0)


def test_int8_symmetric_agrees_with_int8weight():
    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.02
    ours = quantize(w, "int8-b64")
    ref = quantize_int8(w, 64)
    assert torch.allclose(ours.scale * 127, ref.absmax, rtol=1e-6, atol=0)
    same = (codes_of(ours) - 127 == ref.codes.long()).float().mean()
    assert same >= 0.999  # x / (absmax/127) and x / absmax * 127 may round a tie differently
    assert torch.allclose(ours.dequantize(), ref.dequantize(), rtol=0, atol=float(ref.absmax.max()) / 127 + 1e-7)


def test_qmax_and_bad_bits():
    assert [int_qmax(b, True) for b in (2, 4, 8)] == [1, 7, 127]
    assert [int_qmax(b, False) for b in (2, 4, 8)] == [3, 15, 255]
    for bits in (1, 9):
        with pytest.raises(ValueError, match="2..8"):
            int_qmax(bits, True)
        with pytest.raises(ValueError, match="2..8"):
            QuantFormat("int", bits)
