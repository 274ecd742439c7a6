"""DFloat11 codec: bit-exact round trips (every bf16 pattern, specials, odd sizes, real weights), the
compression rate, length-limited codes, fp32, and ValueError on tampered parts."""

from __future__ import annotations

import functools
import heapq

import numpy as np
import pytest
import torch

from slimtune.formats import dfloat11
from slimtune.formats.dfloat11 import (
    MAX_CODE_LENGTH,
    bits_per_value,
    code_lengths,
    decode,
    decode_fp32,
    encode,
    encode_fp32,
)
from slimtune.formats.hf import cache_dir


def _bf16(patterns) -> torch.Tensor:
    """bf16 tensor with the given 16-bit patterns (ints in 0..65535)."""
    bits = torch.as_tensor(patterns, dtype=torch.int32)
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def _assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(a.view(view), b.view(view))


def _round_trip(t: torch.Tensor, block_values: int = dfloat11.BLOCK_VALUES) -> dict:
    parts = encode(t, block_values)
    _assert_bits_equal(decode(parts), t)
    return parts


def _huffman_cost(freqs: list[int]) -> int:
    """Total coded bits of an unconstrained Huffman code (sum of the merged weights)."""
    heap = [f for f in freqs if f]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def _fibonacci(k: int) -> list[int]:
    fib = [1, 1]
    while len(fib) < k:
        fib.append(fib[-1] + fib[-2])
    return fib


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("block_values", [4096, 1000])
def test_every_bf16_bit_pattern(block_values):
    t = _bf16(torch.randperm(65536, generator=torch.Generator().manual_seed(0)))
    _round_trip(t, block_values)


def test_special_values():
    patterns = [
        0x0000,
        0x8000,  # +0, -0
        0x0001,
        0x007F,
        0x8001,
        0x807F,  # subnormals
        0x7F80,
        0xFF80,  # +inf, -inf
        0x7FC0,
        0xFFC0,
        0x7F81,
        0xFF81,
        0x7FFF,
        0xFFFF,
        0x7FA5,
        0xFF5A,  # NaNs with payloads
        0x0080,
        0x7F7F,
        0xFF7F,
        0x3F80,
    ]  # smallest normal, largest finite, 1.0
    t = _bf16(patterns * 7).reshape(7, len(patterns))
    _round_trip(t, block_values=16)


def test_single_distinct_exponent():
    sign_mantissa = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))
    t = _bf16((sign_mantissa & 0x80) << 8 | 127 << 7 | sign_mantissa & 0x7F)  # all in ±[1, 2)
    parts = _round_trip(t, block_values=256)
    assert int((parts["code_lengths"] > 0).sum()) == 1
    assert parts["bitstream"].numel() == 375  # a 1-bit code per value


@pytest.mark.parametrize("shape", [(0,), (3, 0), (), (1,), (63,), (64,), (65,), (4097,), (5, 13, 3)])
def test_odd_sizes(shape):
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    parts = _round_trip(t, block_values=64)
    assert parts["block_offsets"].numel() == -(-t.numel() // 64) + 1


def test_gaussian_weight_compresses_like_dfloat11():
    w = (torch.randn(1024, 576, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    parts = _round_trip(w)
    bits = bits_per_value(parts)
    print(f"gaussian bf16: {bits:.3f} bits/value")
    assert bits < 11.5
    assert {k: v.dtype for k, v in parts.items() if isinstance(v, torch.Tensor)} == {
        "sign_mantissa": torch.uint8,
        "bitstream": torch.uint8,
        "block_offsets": torch.int64,
        "code_lengths": torch.uint8,
    }
    assert parts["shape"] == [1024, 576] and parts["code_lengths"].shape == (256,)


def test_real_smollm2_matrix():
    path = cache_dir() / "smollm2-135m-instruct" / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"SmolLM2 is not cached at {path}")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert w.dtype == torch.bfloat16
    parts = _round_trip(w)
    print(f"smollm2 down_proj {tuple(w.shape)}: {bits_per_value(parts):.3f} bits/value")
    assert bits_per_value(parts) < 12


# ---------------------------------------------------------------- code lengths


def test_code_lengths_capped_for_fibonacci_counts():
    freqs = np.zeros(256, dtype=np.int64)
    freqs[:45] = _fibonacci(45)  # unconstrained Huffman would need 44-bit codes
    lengths = code_lengths(freqs)
    assert lengths.max() <= MAX_CODE_LENGTH and (lengths[:45] > 0).all() and not lengths[45:].any()
    assert sum(2.0 ** -int(n) for n in lengths if n) == 1.0  # a complete prefix code
    capped = code_lengths(freqs, max_length=10)
    assert capped.max() == 10 and sum(2.0 ** -int(n) for n in capped if n) <= 1.0


def test_code_lengths_optimal_when_uncapped():
    rng = np.random.default_rng(4)
    for _ in range(5):
        freqs = rng.integers(0, 1000, 256) * (rng.random(256) < 0.3)
        assert int((code_lengths(freqs) * freqs).sum()) == _huffman_cost(freqs.tolist())


@pytest.mark.parametrize("max_length, longest", [(32, 19), (8, 8)])
def test_fibonacci_exponents_round_trip(monkeypatch, max_length, longest):
    """A Fibonacci-like exponent histogram: 19-bit codes (past the decoder's 16-bit fast table), and with
    the cap lowered to 8 bits, so that it binds, a length-limited code."""
    counts = _fibonacci(20)
    exponents = torch.cat([torch.full((c,), 100 + i, dtype=torch.int32) for i, c in enumerate(counts)])
    t = _bf16(exponents[torch.randperm(len(exponents), generator=torch.Generator().manual_seed(5))] << 7)
    monkeypatch.setattr(dfloat11, "code_lengths", functools.partial(code_lengths, max_length=max_length))
    parts = _round_trip(t, block_values=512)
    assert int(parts["code_lengths"].max()) == longest


# ---------------------------------------------------------------- fp32


def test_fp32_round_trip_and_saving():
    rng = np.random.default_rng(6)
    patterns = rng.integers(0, 1 << 32, 5000, dtype=np.uint64).astype(np.uint32)
    patterns[:8] = [0, 0x80000000, 1, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF]
    t = torch.from_numpy(patterns.view(np.int32)).view(torch.float32)
    parts = encode_fp32(t, block_values=300)
    _assert_bits_equal(decode_fp32(parts), t)
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(7)) * 0.02
    parts = encode_fp32(w)
    _assert_bits_equal(decode_fp32(parts), w)
    print(f"gaussian fp32: {bits_per_value(parts):.3f} bits/value")
    assert bits_per_value(parts) < 32 * 0.9  # >= 10% saved (~16%)


# ---------------------------------------------------------------- tampered parts


@pytest.fixture
def parts() -> dict:
    w = (torch.randn(3000, generator=torch.Generator().manual_seed(8)) * 0.02).to(torch.bfloat16)
    return encode(w, block_values=256)


def _tampered(parts: dict, **changes) -> dict:
    return {**parts, **changes}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: {"bitstream": p["bitstream"][:-1]}, "truncated"),
        (lambda p: {"bitstream": torch.cat([p["bitstream"], p["bitstream"][:2]])}, "truncated or padded"),
        (lambda p: {"block_offsets": p["block_offsets"][:-1]}, "block_offsets has shape"),
        (lambda p: {"block_offsets": p["block_offsets"] + torch.tensor([0, 1] + [0] * 11)}, "block 0 ended at bit"),
        (lambda p: {"block_offsets": p["block_offsets"].flip(0)}, "never decrease"),
        (lambda p: {"block_offsets": p["block_offsets"].to(torch.int32)}, "block_offsets must be a torch.int64"),
        (lambda p: {"code_lengths": torch.where(p["code_lengths"] > 0, 33, 0).to(torch.uint8)}, "> 32"),
        (lambda p: {"code_lengths": torch.where(p["code_lengths"] > 0, 1, 0).to(torch.uint8)}, "Kraft"),
        (lambda p: {"code_lengths": torch.zeros(256, dtype=torch.uint8)}, "all 0"),
        (lambda p: {"sign_mantissa": p["sign_mantissa"][1:]}, "sign_mantissa has shape"),
        (lambda p: {"shape": [3000, -1]}, "non-negative"),
        (lambda p: {"block_values": 0}, "positive int"),
    ],
)
def test_tampered_parts_raise(parts, change, message):
    with pytest.raises(ValueError, match=message):
        decode(_tampered(parts, **change(parts)))


def test_missing_part_and_wrong_dtype_raise(parts):
    with pytest.raises(ValueError, match="lack"):
        decode({k: v for k, v in parts.items() if k != "code_lengths"})
    with pytest.raises(ValueError, match="decode_fp32"):
        decode(encode_fp32(torch.randn(10)))
    with pytest.raises(ValueError, match="bfloat16"):
        encode(torch.randn(10))


def test_bit_pattern_that_is_no_code_raises():
    t = _bf16(torch.arange(100) | 127 << 7)  # one exponent
    parts = encode(t, block_values=64)  # one symbol: the code "0"; a 1 bit starts no code
    with pytest.raises(ValueError, match="no code"):
        decode(_tampered(parts, bitstream=parts["bitstream"] | 0x10))


def test_decode_many_is_bit_exact_across_tensors_of_every_size():
    """One lockstep over several tensors' blocks (their tables stacked) equals decoding each alone."""
    from slimtune.kernels.dfloat11_decode import decode_many

    torch.manual_seed(0)
    all_bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    tensors = [
        (torch.randn(300, 70) * 0.02).bfloat16(),
        torch.tensor([], dtype=torch.bfloat16),
        torch.randn(5).bfloat16(),
        (torch.randn(64, 4096) * 3).bfloat16(),
        all_bits,
    ]
    f32 = torch.randn(1000) * 0.1
    parts = [encode(t) for t in tensors] + [encode_fp32(f32)]
    out = decode_many(parts, [False] * len(tensors) + [True])
    for a, b in zip(tensors, out[:-1]):
        assert a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert torch.equal(out[-1].view(torch.int32), f32.view(torch.int32))
    bad = dict(parts[0])
    bad["block_offsets"] = bad["block_offsets"].clone()
    bad["block_offsets"][1] += 3
    with pytest.raises(ValueError, match="block_offsets"):
        decode_many([bad, parts[2]])
