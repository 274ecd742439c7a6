"""Block-wise symmetric absmax INT8 in pure torch (the frozen linear plumbing is in linear.py).

Format: the weight is flattened row-major and cut into blocks of `block_size` values; each block
stores its absmax (fp32) and codes = round(w / absmax * 127) as int8 in [-127, 127], so
w ~= codes * absmax / 127 with an error of at most absmax / 254 (half a step) per value.
Storage per weight: 8 + 32/block_size bits (8.5 at blocks of 64).

Unlike bitsandbytes' Linear8bitLt (one scale per output row, activations quantized too in its
int8 matmul), this is weight-only: the matmul runs in the compute dtype on the dequantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.quant.linear import FrozenQuantLinear, LinearDequant, check_packed_sizes, packed_nbytes
from slimtune.quant.qformat import QuantFormat
from slimtune.registry import QUANT_FORMATS


def _check_layout(shape, block_size: int) -> int:
    numel = int(torch.Size(shape).numel())
    if block_size <= 0 or numel == 0 or numel % block_size:
        raise ValueError(
            f"INT8 needs numel divisible by block_size={block_size}; weight shape {tuple(shape)} has {numel} elements"
        )
    return numel


@dataclass
class Int8Weight:
    """A block-wise INT8 weight: codes int8 (numel,), absmax fp32 (numel / block_size,)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple
    block_size: int = 64

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> `shape` tensor of `dtype` (computed in fp32, then cast once)."""
        w = self.codes.view(-1, self.block_size).float() * (self.absmax.float() / 127)[:, None]
        return w.view(self.shape).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (safetensors-ready; names match Int8Linear's buffers)."""
        return {"codes": self.codes, "absmax": self.absmax}

    @property
    def nbytes(self) -> int:
        """Storage in bytes: codes + scales."""
        return packed_nbytes(self.tensors())

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], shape, block_size: int = 64) -> "Int8Weight":
        """Inverse of tensors(); validates the sizes against shape / block_size."""
        numel = _check_layout(shape, block_size)
        check_packed_sizes("INT8", d, {"codes": numel, "absmax": numel // block_size}, shape, block_size)
        return cls(codes=d["codes"], absmax=d["absmax"], shape=tuple(shape), block_size=block_size)


@torch.no_grad()
def quantize_int8(w: torch.Tensor, block_size: int = 64) -> Int8Weight:
    """w: any shape with numel % block_size == 0 (any float dtype; computed in fp32) -> Int8Weight."""
    _check_layout(w.shape, block_size)
    blocks = w.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():  # nan/inf would silently poison a whole block
        raise ValueError(f"cannot INT8-quantize a weight of shape {tuple(w.shape)} with non-finite values")
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # all-zero block -> codes 0
    codes = torch.round(blocks / safe[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes=codes.flatten(), absmax=absmax, shape=tuple(w.shape), block_size=block_size)


class LinearInt8(LinearDequant):
    """LinearDequant for an Int8Weight: LinearInt8.apply(x, int8_weight, bias)."""


@QUANT_FORMATS.register("int8")
class Int8Linear(FrozenQuantLinear):
    """Frozen block-wise INT8 linear. Buffers: codes int8 (out*in,), absmax fp32 (out*in/block_size,)."""

    format = "int8"
    _function = LinearInt8

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        compute_dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        _check_layout((out_features, in_features), block_size)
        self.fmt = QuantFormat("int", 8, block_size)
        self._init_common(in_features, out_features, bias, block_size, compute_dtype, device)

    @classmethod
    def make(cls, fmt, in_features, out_features, bias=False, compute_dtype=None, device=None) -> "Int8Linear":
        if (fmt.kind, fmt.bits) != ("int", 8):  # its scales stay fp32: quant.double_quant does not apply
            raise ValueError(f"Int8Linear stores int8 (symmetric), not {fmt.name}")
        return cls(in_features, out_features, bias, fmt.block_size, compute_dtype, device)

    @classmethod
    def from_linear(cls, linear, block_size: int = 64, compute_dtype: torch.dtype | None = None) -> "Int8Linear":
        """Quantize `linear`'s weight on its device; the bias is kept (frozen) in compute_dtype or its own."""
        return cls.quantize_linear(linear, QuantFormat("int", 8, block_size), compute_dtype)

    @classmethod
    def tensor_layout(cls, fmt, shape) -> dict[str, tuple[int, torch.dtype]]:
        numel = _check_layout(shape, fmt.block_size)  # fp32 scales: quant.double_quant does not apply
        return {"codes": (numel, torch.int8), "absmax": (numel // fmt.block_size, torch.float32)}

    def _quantize(self, w: torch.Tensor) -> Int8Weight:
        return quantize_int8(w, self.block_size)

    def _empty(self, device) -> Int8Weight:
        n = self.out_features * self.in_features
        return Int8Weight(
            codes=torch.zeros(n, dtype=torch.int8, device=device),
            absmax=torch.zeros(n // self.block_size, device=device),
            shape=(self.out_features, self.in_features),
            block_size=self.block_size,
        )

    def _packed(self) -> Int8Weight:
        """The buffers viewed as an Int8Weight (shares storage, no copy)."""
        return Int8Weight(
            codes=self.codes,
            absmax=self.absmax,
            shape=(self.out_features, self.in_features),
            block_size=self.block_size,
        )
