"""Dense MSB-first bit packing vs a bit-string reference, NF4's nibble packing and hand-computed bytes."""

import math

import pytest
import torch

from slimtune.quant.nf4 import pack_codes
from slimtune.quant.packing import pack_bits, packed_len, unpack_bits


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """Slow and obvious: write every code as `bits` binary digits, pad with zeros, cut into bytes."""
    stream = "".join(format(c, f"0{bits}b") for c in codes)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 8, 9, 24, 63, 1000, 1003])
def test_roundtrip_and_length(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    assert packed_len(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    assert packed.tolist() == reference_pack(codes.tolist(), bits)


def test_all_ones_and_extremes():
    for bits in range(1, 9):
        codes = torch.full((77,), 2**bits - 1, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert torch.equal(unpack_bits(packed, bits, 77), codes)
        pad = packed.numel() * 8 - 77 * bits  # only the last byte holds padding, as zero bits
        assert packed[:-1].eq(255).all() and int(packed[-1]) == (255 << pad) & 255


def test_bits4_equals_nf4_nibble_packing():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4096,), dtype=torch.uint8, generator=gen)
    assert torch.equal(pack_bits(codes, 4), pack_codes(codes))


def test_hand_computed_3bit():
    # 001 010 011 100 101 110 111 000 -> 00101001 11001011 10111000
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [0x29, 0xCB, 0xB8]
    # ragged: 111 001 + two padding bits -> 11100100
    assert pack_bits(torch.tensor([7, 1], dtype=torch.uint8), 3).tolist() == [0xE4]
    assert unpack_bits(torch.tensor([0xE4], dtype=torch.uint8), 3, 2).tolist() == [7, 1]


def test_hand_computed_5bit_and_2bit():
    # 11111 00001 + 6 padding bits -> 11111000 01000000
    assert pack_bits(torch.tensor([31, 1], dtype=torch.uint8), 5).tolist() == [0xF8, 0x40]
    # 11 10 01 00 -> 11100100; then 01 + padding -> 01000000
    assert pack_bits(torch.tensor([3, 2, 1, 0, 1], dtype=torch.uint8), 2).tolist() == [0xE4, 0x40]


def test_bits8_is_a_copy():
    codes = torch.arange(256, dtype=torch.uint8)
    packed = pack_bits(codes, 8)
    assert torch.equal(packed, codes) and packed.data_ptr() != codes.data_ptr()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bits"):
        packed_len(4, 0)
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.zeros(4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="expected 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
