"""Low-bit block-wise weights with true bit packing: NF-k (nfk.py) and INT-k (intk.py), k = 2..8.

A `QuantFormat` names the layout ("nf3-b64-dq", "int4a-b128": kind, bits, block size, double quant). The
weight is flattened row-major and cut into blocks of `block_size` values; the k-bit codes of the whole
weight form one dense MSB-first bitstream (packing.py), so only the last byte can hold padding, and the
block size need not be even. Per block: `scale` fp32 (NF: absmax; INT: the grid step) and, asymmetric
INT only, `zero` fp32 (the block min). With double quantization each of those vectors is stored as
`<name>_q` int8 + `<name>_scale` fp32 (one per 256 blocks) + `<name>_offset` fp32 (1,) (scales.py).
Codes are always computed against the exact fp32 scales (as NF4 does); double quantization only adds the
int8 rounding of the scales on top.

Storage per weight (blocks of 64): nf3 3.5 bits (3.127 with dq), int4a 5.0 (4.254 with dq).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.registry import QUANT_FORMATS
from slimtune.quant.intk import dequantize_int_blocks, quantize_int_blocks
from slimtune.quant.linear import (
    FrozenQuantLinear,
    LinearDequant,
    check_packed_sizes,
    packed_nbytes,
)
from slimtune.quant.nfk import dequantize_nf_blocks, quantize_nf_blocks
from slimtune.quant.packing import pack_bits, unpack_bits
from slimtune.quant.qformat import QuantFormat
from slimtune.quant.scales import double_dequantize, double_quantize


@dataclass
class PackedWeight:
    """A packed weight (n = numel, nb = n / block_size): codes uint8 (ceil(n * bits / 8),); scale fp32
    (nb,) and, for int_asym, zero fp32 (nb,); double-quantized, each of those as <name>_q int8 (nb,),
    <name>_scale fp32 (ceil(nb / 256),), <name>_offset fp32 (1,) instead."""

    fmt: QuantFormat
    shape: tuple
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    scale_q: torch.Tensor | None = None
    scale_scale: torch.Tensor | None = None
    scale_offset: torch.Tensor | None = None
    zero_q: torch.Tensor | None = None
    zero_scale: torch.Tensor | None = None
    zero_offset: torch.Tensor | None = None

    def _vector(self, prefix: str) -> torch.Tensor:
        if not self.fmt.double_quant:
            return getattr(self, prefix).float()
        return double_dequantize(*(getattr(self, f"{prefix}_{part}") for part in ("q", "scale", "offset")))

    def block_scale(self) -> torch.Tensor:
        """fp32 (nb,): per-block scale (NF: absmax; INT: grid step), reconstructed from int8 under dq."""
        return self._vector("scale")

    def block_zero(self) -> torch.Tensor | None:
        """fp32 (nb,) per-block min for int_asym (reconstructed from int8 under dq), else None."""
        return self._vector("zero") if self.fmt.kind == "int_asym" else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> `shape` tensor of `dtype` (computed in fp32, then cast once)."""
        codes = unpack_bits(self.codes, self.fmt.bits, math.prod(self.shape))
        if self.fmt.kind == "nf":
            w = dequantize_nf_blocks(codes, self.block_scale(), self.fmt.bits)
        else:
            w = dequantize_int_blocks(
                codes, self.block_scale(), self.block_zero(), self.fmt.bits, symmetric=self.fmt.kind == "int"
            )
        return w.view(self.shape).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by flat name (safetensors-ready; names match PackedLinear's buffers)."""
        return {k: getattr(self, k) for k in self.fmt.tensor_layout(self.shape)}

    @property
    def nbytes(self) -> int:
        """Storage in bytes: packed codes + scales."""
        return packed_nbytes(self.tensors())

    @property
    def bits_per_param(self) -> float:
        """nbytes * 8 / numel."""
        return self.nbytes * 8 / math.prod(self.shape)

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], fmt: QuantFormat | str, shape) -> PackedWeight:
        """Inverse of tensors(); ValueError naming the first tensor whose size does not fit fmt / shape."""
        fmt = QuantFormat.parse(fmt)
        want = {k: n for k, (n, _) in fmt.tensor_layout(shape).items()}
        check_packed_sizes(fmt.name, d, want, shape, fmt.block_size)
        return cls(fmt=fmt, shape=tuple(shape), **{k: d[k] for k in want})


@torch.no_grad()
def quantize(
    w: torch.Tensor, fmt: QuantFormat | str, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> PackedWeight:
    """w: any shape with numel % block_size == 0 (any float dtype; computed in fp32) -> PackedWeight. scale,
    zero: fp32 (nb,) block scales (and asymmetric zeros) to code against and store, instead of the blocks'
    own (QAT's learned scales)."""
    fmt = QuantFormat.parse(fmt)
    fmt.check_shape(w.shape)
    blocks = w.detach().float().reshape(-1, fmt.block_size)
    if fmt.kind == "nf":
        codes, scale = quantize_nf_blocks(blocks, fmt.bits, scale)
        zero = None
    else:
        codes, scale, zero = quantize_int_blocks(blocks, fmt.bits, fmt.kind == "int", scale, zero)
    # amax / amin propagate nan and inf into the per-block stats: one cheap check per block
    if not torch.isfinite(scale).all() or (zero is not None and not torch.isfinite(zero).all()):
        raise ValueError(f"cannot {fmt.name}-quantize a weight of shape {tuple(w.shape)} with non-finite values")
    return with_scales(fmt, tuple(w.shape), pack_bits(codes, fmt.bits), scale, zero)


def with_scales(fmt: QuantFormat, shape: tuple, codes: torch.Tensor, scale: torch.Tensor, zero=None) -> PackedWeight:
    """The PackedWeight of packed `codes` with fp32 block `scale` (and `zero`), stored as the format stores them
    (double-quantized when it says so)."""
    vectors = {"scale": scale} if zero is None else {"scale": scale, "zero": zero}
    stored = {}
    for prefix, v in vectors.items():
        stored.update(double_quantize(v, prefix) if fmt.double_quant else {prefix: v})
    return PackedWeight(fmt=fmt, shape=shape, codes=codes, **stored)


def bits_per_param(x) -> float:
    """Storage bits per weight value of a packed-weight holder (PackedWeight, NF4Weight, Int8Weight: any
    with .nbytes and .shape) or a slimtune quantized linear (its packed weight only, bias excluded)."""
    if isinstance(x, FrozenQuantLinear):
        x = x._packed()
    if not (hasattr(x, "nbytes") and hasattr(x, "shape") and hasattr(x, "dequantize")):
        raise TypeError(
            f"bits_per_param: expected a packed weight or a slimtune quantized linear, got {type(x).__name__}"
        )
    return x.nbytes * 8 / math.prod(x.shape)


class LinearPacked(LinearDequant):
    """LinearDequant for a PackedWeight: LinearPacked.apply(x, packed_weight, bias)."""


# quant.method names PackedLinear serves ("nf4" and "int8" have their own NF4Linear / Int8Linear)
PACKED_METHODS = ("nf2", "nf3", *(f"int{k}" for k in range(2, 8)), *(f"int{k}a" for k in range(2, 9)))


class PackedLinear(FrozenQuantLinear):
    """Frozen low-bit linear in any QuantFormat (default "nf3"). x: (..., in_features) -> (..., out_features).

    Buffers: PackedWeight.tensors() (codes uint8 bitstream, scale / zero fp32 or their int8 double-quantized
    form); bias: frozen Parameter or None. `format` is fmt.name, `block_size` fmt.block_size.
    """

    _function = LinearPacked

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: QuantFormat | str = "nf3",
        compute_dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.fmt = QuantFormat.parse(fmt)
        self.format, self.double_quant = self.fmt.name, self.fmt.double_quant
        self.fmt.check_shape((out_features, in_features))
        self._init_common(in_features, out_features, bias, self.fmt.block_size, compute_dtype, device)

    @classmethod
    def make(cls, fmt, in_features, out_features, bias=False, compute_dtype=None, device=None) -> PackedLinear:
        return cls(in_features, out_features, bias, fmt, compute_dtype, device)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: QuantFormat | str = "nf3", compute_dtype: torch.dtype | None = None
    ) -> PackedLinear:
        """Quantize `linear`'s weight on its device; the bias is kept (frozen) in compute_dtype or its own."""
        return cls.quantize_linear(linear, QuantFormat.parse(fmt), compute_dtype)

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
    ) -> PackedLinear:
        """Wrap an existing (out, in) PackedWeight (its tensors become the buffers, no copy)."""
        if len(packed.shape) != 2:
            raise ValueError(f"PackedLinear needs a 2-D (out, in) weight, got shape {tuple(packed.shape)}")
        out_features, in_features = packed.shape
        m = cls(
            in_features,
            out_features,
            bias=False,
            fmt=packed.fmt,
            compute_dtype=compute_dtype,
            device=packed.codes.device,
        )
        m._set_packed(PackedWeight.from_tensors(packed.tensors(), packed.fmt, packed.shape))
        m.set_bias(bias)
        return m

    def _quantize(self, w: torch.Tensor) -> PackedWeight:
        return quantize(w, self.fmt)

    def _empty(self, device) -> PackedWeight:
        shape = (self.out_features, self.in_features)
        zeros = {k: torch.zeros(n, dtype=dt, device=device) for k, (n, dt) in self.fmt.tensor_layout(shape).items()}
        return PackedWeight(fmt=self.fmt, shape=shape, **zeros)

    def _packed(self) -> PackedWeight:
        """The buffers viewed as a PackedWeight (shares storage, no copy)."""
        return PackedWeight(fmt=self.fmt, shape=(self.out_features, self.in_features), **self.packed_tensors())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", double_quant={self.double_quant}"


for _method in PACKED_METHODS:
    QUANT_FORMATS.register(_method)(PackedLinear)
