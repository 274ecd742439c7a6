"""DFloat11 Triton decoder against the torch reference (slimtune.formats.dfloat11.decode).

Kernel tests run on CUDA, or on CPU under TRITON_INTERPRET=1 (set by conftest before triton is imported)."""

from __future__ import annotations

import pytest
from slimtune_testutil import use_kernels
import torch

from slimtune.formats.dfloat11 import decode, encode
from slimtune.kernels.dfloat11_decode import decode_triton
from slimtune.kernels.dfloat11_decode import dfloat11_decode
from slimtune.kernels.dispatch import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")


def _on_device(parts: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in parts.items()}


def _adversarial(n: int) -> torch.Tensor:
    """n bf16 values: every exponent, ±0, subnormals, ±inf, NaN payloads, then random bit patterns."""
    special = torch.tensor([0x0000, 0x8000, 0x0001, 0x807F, 0x7F80, 0xFF80, 0x7FC0, 0xFF81, 0x7FFF, 0xFFFF])
    every_exponent = torch.arange(256) << 7 | torch.arange(256) % 128 | (torch.arange(256) % 2) << 15
    rest = torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(0))
    bits = torch.cat([special, every_exponent, rest])[:n].to(torch.int32)
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def _every_pattern() -> torch.Tensor:
    """All 65536 bf16 bit patterns in random order."""
    bits = torch.randperm(65536, generator=torch.Generator().manual_seed(2)).to(torch.int32)
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize(
    "make, block_values",
    [
        (lambda: _adversarial(3001), 64),  # a partial last block
        (lambda: _every_pattern(), 300),  # 219 blocks, the last one partial
        (lambda: (torch.randn(48, 80, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16), 128),
        (lambda: torch.ones(1, dtype=torch.bfloat16), 64),
        (lambda: torch.zeros(0, 7, dtype=torch.bfloat16), 64),
    ],
)
def test_kernel_equals_reference(make, block_values):
    t = make()
    parts = encode(t, block_values)
    got = decode_triton(_on_device(parts)).cpu()
    want = decode(parts)
    assert got.shape == want.shape == t.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.equal(got.view(torch.int16), t.view(torch.int16))


@needs_kernel
def test_kernel_rejects_wrong_offsets():
    parts = encode(_adversarial(700), block_values=64)
    offsets = parts["block_offsets"].clone()
    offsets[3] += 2
    with pytest.raises(ValueError, match="block 2 ended at bit"):
        decode_triton(_on_device({**parts, "block_offsets": offsets}))


@needs_kernel
def test_dispatch_runs_the_kernel(monkeypatch):
    use_kernels(monkeypatch, "triton")
    t = _adversarial(500)
    got = dfloat11_decode(encode(t, block_values=64), DEVICE).cpu()
    assert torch.equal(got.view(torch.int16), t.view(torch.int16))
