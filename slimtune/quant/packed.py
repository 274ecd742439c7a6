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
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from slimtune.quant.int8 import Int8Weight
from slimtune.quant.intk import INT_BITS, dequantize_int_blocks, quantize_int_blocks
from slimtune.quant.linear import (
    FrozenQuantLinear,
    LinearDequant,
    check_packed_sizes,
    packed_nbytes,
)
from slimtune.quant.nf4 import NF4Weight
from slimtune.quant.nfk import NF_BITS, dequantize_nf_blocks, quantize_nf_blocks
from slimtune.quant.packing import pack_bits, packed_len, unpack_bits
from slimtune.quant.scales import double_dequantize, double_quant_sizes, double_quantize

KINDS = {"nf": NF_BITS, "int": INT_BITS, "int_asym": INT_BITS}  # kind -> valid bits
_NAME_RE = re.compile(r"(nf|int)(\d+)(a?)(?:-b(\d+))?(-dq)?")
_VALID_NAMES = ("nf2..nf8, int2..int8 (symmetric), int2a..int8a (asymmetric), optionally followed by "
                "-b<block_size> and -dq, e.g. 'nf3', 'int4a-b128', 'nf3-b64-dq'")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class QuantFormat:
    """A packed format: kind "nf" | "int" | "int_asym", bits, block_size (> 0, must divide numel), and
    whether the per-block fp32 vectors are double-quantized to int8."""

    kind: str
    bits: int
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown QuantFormat kind {self.kind!r}; valid: {', '.join(KINDS)}")
        valid = KINDS[self.kind]
        if not _is_int(self.bits) or self.bits not in valid:
            raise ValueError(f"{self.kind} bits must be in {valid.start}..{valid.stop - 1}, got {self.bits!r}")
        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")

    @property
    def name(self) -> str:
        """E.g. "nf3-b64", "int4a-b128-dq"; QuantFormat.parse(fmt.name) == fmt."""
        prefix = "nf" if self.kind == "nf" else "int"
        suffix = "a" if self.kind == "int_asym" else ""
        return f"{prefix}{self.bits}{suffix}-b{self.block_size}" + ("-dq" if self.double_quant else "")

    @classmethod
    def parse(cls, name: str | QuantFormat, block_size: int | None = None,
              double_quant: bool | None = None) -> QuantFormat:
        """"nf3" / "int4a-b128" / "nf3-b64-dq" (or a QuantFormat) -> QuantFormat. Short names default to
        block_size=64, double_quant=False; the keyword arguments, when not None, override the name."""
        if isinstance(name, QuantFormat):
            fmt = name
        else:
            m = _NAME_RE.fullmatch(name.strip().lower()) if isinstance(name, str) else None
            if m is None:
                raise ValueError(f"unknown quantization format {name!r}; valid: {_VALID_NAMES}")
            prefix, bits, asym, block, dq = m.groups()
            if prefix == "nf" and asym:
                raise ValueError(f"unknown quantization format {name!r} (NF has no asymmetric variant); "
                                 f"valid: {_VALID_NAMES}")
            try:
                fmt = cls("int_asym" if asym else prefix, int(bits), int(block) if block else 64, dq is not None)
            except ValueError as e:
                raise ValueError(f"unknown quantization format {name!r} ({e}); valid: {_VALID_NAMES}") from None
        overrides = {k: v for k, v in (("block_size", block_size), ("double_quant", double_quant)) if v is not None}
        return replace(fmt, **overrides) if overrides else fmt

    def check_shape(self, shape) -> int:
        """numel of `shape`; ValueError unless it is positive and divisible by block_size."""
        numel = math.prod(shape)
        if numel == 0 or numel % self.block_size:
            raise ValueError(f"{self.name} needs numel divisible by block_size={self.block_size}; weight shape "
                             f"{tuple(shape)} has {numel} elements")
        return numel

    def tensor_layout(self, shape) -> dict[str, tuple[int, torch.dtype]]:
        """Stored tensors by name -> (element count, dtype), in PackedWeight.tensors() order."""
        numel = self.check_shape(shape)
        nb = numel // self.block_size
        layout = {"codes": (packed_len(numel, self.bits), torch.uint8)}
        for prefix in ("scale", "zero") if self.kind == "int_asym" else ("scale",):
            if not self.double_quant:
                layout[prefix] = (nb, torch.float32)
                continue
            for k, n in double_quant_sizes(nb, prefix).items():
                layout[k] = (n, torch.int8 if k.endswith("_q") else torch.float32)
        return layout

    def bits_per_param(self, shape) -> float:
        """Exact storage bits per weight value (codes incl. last-byte padding + scales), without quantizing."""
        nbytes = sum(n * dt.itemsize for n, dt in self.tensor_layout(shape).values())
        return nbytes * 8 / math.prod(shape)


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
            w = dequantize_int_blocks(codes, self.block_scale(), self.block_zero(), self.fmt.bits,
                                      symmetric=self.fmt.kind == "int")
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
def quantize(w: torch.Tensor, fmt: QuantFormat | str) -> PackedWeight:
    """w: any shape with numel % block_size == 0 (any float dtype; computed in fp32) -> PackedWeight."""
    fmt = QuantFormat.parse(fmt)
    fmt.check_shape(w.shape)
    blocks = w.detach().float().reshape(-1, fmt.block_size)
    if fmt.kind == "nf":
        codes, scale = quantize_nf_blocks(blocks, fmt.bits)
        zero = None
    else:
        codes, scale, zero = quantize_int_blocks(blocks, fmt.bits, symmetric=fmt.kind == "int")
    # amax / amin propagate nan and inf into the per-block stats: one cheap check per block
    if not torch.isfinite(scale).all() or (zero is not None and not torch.isfinite(zero).all()):
        raise ValueError(f"cannot {fmt.name}-quantize a weight of shape {tuple(w.shape)} with non-finite values")
    vectors = {"scale": scale} if zero is None else {"scale": scale, "zero": zero}
    stored = {}
    for prefix, v in vectors.items():
        stored.update(double_quantize(v, prefix) if fmt.double_quant else {prefix: v})
    return PackedWeight(fmt=fmt, shape=tuple(w.shape), codes=pack_bits(codes, fmt.bits), **stored)


def bits_per_param(x) -> float:
    """Storage bits per weight value of a PackedWeight, NF4Weight, Int8Weight, or a slimtune quantized
    linear (PackedLinear / NF4Linear / Int8Linear; its packed weight only, bias excluded)."""
    if isinstance(x, FrozenQuantLinear):
        x = x._packed()
    if isinstance(x, (PackedWeight, NF4Weight, Int8Weight)):
        return x.nbytes * 8 / math.prod(x.shape)
    raise TypeError(f"bits_per_param: expected a packed weight or a slimtune quantized linear, "
                    f"got {type(x).__name__}")


class LinearPacked(LinearDequant):
    """LinearDequant for a PackedWeight: LinearPacked.apply(x, packed_weight, bias)."""


class PackedLinear(FrozenQuantLinear):
    """Frozen low-bit linear in any QuantFormat (default "nf3"). x: (..., in_features) -> (..., out_features).

    Buffers: PackedWeight.tensors() (codes uint8 bitstream, scale / zero fp32 or their int8 double-quantized
    form); bias: frozen Parameter or None. `format` is fmt.name, `block_size` fmt.block_size.
    """

    _function = LinearPacked

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: QuantFormat | str = "nf3",
                 compute_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.fmt = QuantFormat.parse(fmt)
        self.format, self.double_quant = self.fmt.name, self.fmt.double_quant
        self.fmt.check_shape((out_features, in_features))
        self._init_common(in_features, out_features, bias, self.fmt.block_size, compute_dtype, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: QuantFormat | str = "nf3",
                    compute_dtype: torch.dtype | None = None) -> PackedLinear:
        """Quantize `linear`'s weight on its device; the bias is kept (frozen) in compute_dtype or its own."""
        m = cls(linear.in_features, linear.out_features, bias=False, fmt=fmt, compute_dtype=compute_dtype,
                device=linear.weight.device)
        m.requantize_(linear.weight)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().to(compute_dtype or linear.bias.dtype), requires_grad=False)
        return m

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> PackedLinear:
        """Wrap an existing (out, in) PackedWeight (its tensors become the buffers, no copy)."""
        if len(packed.shape) != 2:
            raise ValueError(f"PackedLinear needs a 2-D (out, in) weight, got shape {tuple(packed.shape)}")
        out_features, in_features = packed.shape
        m = cls(in_features, out_features, bias=False, fmt=packed.fmt, compute_dtype=compute_dtype,
                device=packed.codes.device)
        m._set_packed(PackedWeight.from_tensors(packed.tensors(), packed.fmt, packed.shape))
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(compute_dtype or bias.dtype), requires_grad=False)
        return m

    def _quantize(self, w: torch.Tensor) -> PackedWeight:
        return quantize(w, self.fmt)

    def _empty(self, device) -> PackedWeight:
        shape = (self.out_features, self.in_features)
        zeros = {k: torch.zeros(n, dtype=dt, device=device) for k, (n, dt) in self.fmt.tensor_layout(shape).items()}
        return PackedWeight(fmt=self.fmt, shape=shape, **zeros)

    def _packed(self) -> PackedWeight:
        """The buffers viewed as a PackedWeight (shares storage, no copy)."""
        return PackedWeight(fmt=self.fmt, shape=(self.out_features, self.in_features),
                            **dict(self.named_buffers(recurse=False)))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", double_quant={self.double_quant}"
