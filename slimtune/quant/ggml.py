"""llama.cpp's block formats as slimtune quantized linears, stored as the GGUF file stores them: each row of the
(out, in) weight cut into blocks, each block the type's bytes. The legacy types, blocks of 32 values:

    q8_0  d = absmax / 127                  q = round-half-away(v / d)             v ~= d q            (34 bytes)
    q4_0  d = m / -8 (m: the signed value   q = trunc(v / d + 8.5) in 0..15         v ~= d (q - 8)      (18 bytes)
          of largest magnitude)
    q5_0  d = m / -16                       q = trunc(v / d + 16.5) in 0..31        v ~= d (q - 16)     (22 bytes)
    q4_1  d = (max - min) / 15, m = min     q = trunc((v - m) / d + 0.5) in 0..15   v ~= d q + m        (20 bytes)
    q5_1  d = (max - min) / 31, m = min     q = trunc((v - m) / d + 0.5) in 0..31   v ~= d q + m        (24 bytes)

Codes are computed against the fp32 d (and m); d and m are stored as fp16, which is what dequantizing reads, as
ggml-quants.c does. The byte layout per block: d (fp16), [m (fp16)], [the codes' 5th bits, 4 bytes, little
endian], the low nibbles (values 0..15 of the block in the low halves, 16..31 in the high halves) or int8 codes.
Bit for bit the `gguf` package's reference quantizer and dequantizer (tests/quant/test_ggml.py), so a weight
trained against these grids (qat.method=q4_0) is exported with no rounding left.

The K types q4_k and q6_k (quant/ggml_k.py) take super-blocks of 256 values; a weight whose rows are not whole
super-blocks is stored as llama.cpp's quantizer stores it, in its fallback type (q4_k -> q5_0, q6_k -> q8_0):
`GGMLFormat.stored_type(shape)` says which, for quantizing, training against and exporting alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimtune.quant.ggml_k import K_TYPES, QK_K, dequantize_k, quantize_k
from slimtune.quant.linear import FrozenQuantLinear, LinearDequant
from slimtune.registry import QUANT_FORMATS

BLOCK = 32
# type -> (bits, asymmetric (has a min), bytes per block)
GGML_TYPES = {"q8_0": (8, False, 34), "q4_0": (4, False, 18), "q4_1": (4, True, 20), "q5_0": (5, False, 22)}
GGML_TYPES |= {"q5_1": (5, True, 24), "q4_k": (4, True, K_TYPES["q4_k"]), "q6_k": (6, False, K_TYPES["q6_k"])}
FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}  # llama.cpp's type for a K-type tensor whose rows are not whole blocks


def block_values(ggml_type: str) -> int:
    return QK_K if ggml_type in K_TYPES else BLOCK


@dataclass(frozen=True)
class GGMLFormat:
    """One of GGML_TYPES: blocks of 32 values along each row (the row length must be a multiple of 32)."""

    type: str
    block_size: int = BLOCK
    double_quant: bool = False

    @property
    def name(self) -> str:
        return self.type

    @property
    def bits(self) -> int:
        return GGML_TYPES[self.type][0]

    @property
    def asymmetric(self) -> bool:
        return GGML_TYPES[self.type][1]

    @property
    def type_size(self) -> int:
        return GGML_TYPES[self.type][2]

    @property
    def exact_zero(self) -> bool:
        """0 codes to exactly 0 in the symmetric types (q * d with q = 0); q4_1 / q5_1 / q4_k span [min, max]."""
        return not self.asymmetric

    def stored_type(self, shape) -> str:
        """The type a weight of `shape` is stored in: this one, or its fallback when rows are not whole blocks."""
        return self.type if shape[-1] % block_values(self.type) == 0 else FALLBACK[self.type]

    def check_shape(self, shape) -> int:
        numel = math.prod(shape)
        if numel == 0 or shape[-1] % BLOCK:
            raise ValueError(
                f"{self.type} cuts each row into blocks of {BLOCK}; weight shape {tuple(shape)} has rows of "
                f"{shape[-1]} values"
            )
        return numel

    def tensor_layout(self, shape) -> dict[str, tuple[int, torch.dtype]]:
        t = self.stored_type(shape)
        return {"blocks": (self.check_shape(shape) // block_values(t) * GGML_TYPES[t][2], torch.uint8)}

    def bits_per_param(self, shape) -> float:
        t = self.stored_type(shape)
        return GGML_TYPES[t][2] * 8 / block_values(t)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(nb,) fp32 -> (nb, 2) uint8: the fp16 value's little-endian bytes."""
    return x.to(torch.float16).view(torch.uint8).view(-1, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(nb, 32) uint8 codes -> (nb, 16): value i's low 4 bits in byte i's low half, value 16 + i's in its high."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(nb, 32) 5-bit codes -> (nb, 4) uint8: bit 4 of value i at bit i of a little-endian uint32."""
    bits = (q >> 4).to(torch.int64) & 1
    word = (bits << torch.arange(32, device=q.device)).sum(dim=1)
    return torch.stack([(word >> (8 * k)) & 0xFF for k in range(4)], dim=1).to(torch.uint8)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf, as the gguf package writes it: sign(x) (floor|x| + floor(2 (|x| - floor|x|)))."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


@torch.no_grad()
def quantize_ggml(w: torch.Tensor, fmt: GGMLFormat) -> "GGMLWeight":
    """w (out, in), any float dtype (computed in fp32) -> GGMLWeight, byte for byte llama.cpp's reference."""
    fmt.check_shape(w.shape)
    shape, stored = tuple(w.shape), GGMLFormat(fmt.stored_type(w.shape))
    blocks = w.detach().float().reshape(-1, block_values(stored.type))
    if not torch.isfinite(blocks).all():
        raise ValueError(f"cannot {fmt.type}-quantize a weight of shape {shape} with non-finite values")
    if stored.type in K_TYPES:
        return GGMLWeight(fmt, shape, quantize_k(blocks, stored.type).flatten())
    bits = stored.bits
    if stored.type == "q8_0":
        d = blocks.abs().amax(dim=1) / 127
        q = _round_half_away(blocks * _inverse(d)[:, None]).to(torch.int8).view(torch.uint8)
        return GGMLWeight(fmt, shape, torch.cat([_fp16_bytes(d), q], dim=1).flatten())
    top = 2**bits - 1
    if stored.asymmetric:
        lo = blocks.amin(dim=1)
        d = (blocks.amax(dim=1) - lo) / top
        q = torch.trunc((blocks - lo[:, None]) * _inverse(d)[:, None] + 0.5)
        head = [_fp16_bytes(d), _fp16_bytes(lo)]
    else:
        imax = blocks.abs().argmax(dim=1, keepdim=True)
        d = blocks.gather(1, imax).squeeze(1) / -(2 ** (bits - 1))
        q = torch.trunc(blocks * _inverse(d)[:, None] + (2 ** (bits - 1) + 0.5))
        head = [_fp16_bytes(d)]
    q = q.clamp_(0, top).to(torch.uint8)
    parts = [*head, _high_bits(q)] if bits == 5 else head
    return GGMLWeight(fmt, shape, torch.cat([*parts, _nibbles(q)], dim=1).flatten())


@dataclass
class GGMLWeight:
    """A weight in a GGML block type (stored in `stored.type`): blocks uint8, the GGUF tensor's bytes."""

    fmt: GGMLFormat
    shape: tuple
    blocks: torch.Tensor

    @property
    def stored(self) -> GGMLFormat:
        return GGMLFormat(self.fmt.stored_type(self.shape))

    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A legacy type's (codes (nb, 32) int64 (signed for the symmetric types), d fp32 (nb,), m fp32 or None)."""
        stored = self.stored
        raw = self.blocks.view(-1, stored.type_size)
        d = raw[:, :2].contiguous().view(torch.float16).float().flatten()
        if stored.type == "q8_0":
            return raw[:, 2:].contiguous().view(torch.int8).long(), d, None
        m = raw[:, 2:4].contiguous().view(torch.float16).float().flatten() if stored.asymmetric else None
        rest = raw[:, 4:] if stored.asymmetric else raw[:, 2:]
        nib = rest[:, -16:].long()
        q = torch.cat([nib & 0x0F, nib >> 4], dim=1)
        if stored.bits == 5:
            high = rest[:, :4].long()
            word = sum(high[:, k] << (8 * k) for k in range(4))
            q = q | (((word[:, None] >> torch.arange(32, device=q.device)) & 1) << 4)
        if m is None:
            q = q - 2 ** (stored.bits - 1)
        return q, d, m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        stored = self.stored
        if stored.type in K_TYPES:
            return dequantize_k(self.blocks.view(-1, stored.type_size), stored.type).view(self.shape).to(dtype)
        q, d, m = self.codes_and_scales()
        w = d[:, None] * q.float()
        if m is not None:
            w = w + m[:, None]
        return w.view(self.shape).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks}

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


class LinearGGML(LinearDequant):
    """LinearDequant for a GGMLWeight."""


class GGMLLinear(FrozenQuantLinear):
    """Frozen linear in a GGML block type (quant.method / qat.method q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q6_k; the
    block size is the type's, quant.block_size and quant.double_quant do not apply). Buffer: blocks uint8."""

    _function = LinearGGML
    bnb_methods = ()

    def __init__(self, in_features, out_features, bias=True, fmt="q4_0", compute_dtype=None, device=None):
        super().__init__()
        self.fmt = fmt if isinstance(fmt, GGMLFormat) else GGMLLinear.format_for(fmt)
        self.format = self.fmt.type
        self.fmt.check_shape((out_features, in_features))
        self._init_common(in_features, out_features, bias, BLOCK, compute_dtype, device)

    @classmethod
    def format_for(cls, name, block_size=None, double_quant=None, options=None) -> GGMLFormat:
        if name not in GGML_TYPES:
            raise ValueError(f"unknown GGML type {name!r}; valid: {', '.join(GGML_TYPES)}")
        return GGMLFormat(name)

    @classmethod
    def make(cls, fmt, in_features, out_features, bias=False, compute_dtype=None, device=None) -> "GGMLLinear":
        return cls(in_features, out_features, bias, fmt, compute_dtype, device)

    def _quantize(self, w: torch.Tensor) -> GGMLWeight:
        return quantize_ggml(w, self.fmt)

    def _empty(self, device) -> GGMLWeight:
        shape = (self.out_features, self.in_features)
        n, dtype = self.fmt.tensor_layout(shape)["blocks"]
        return GGMLWeight(self.fmt, shape, torch.zeros(n, dtype=dtype, device=device))

    def _packed(self) -> GGMLWeight:
        return GGMLWeight(self.fmt, (self.out_features, self.in_features), self.packed_tensors()["blocks"])


for _type in GGML_TYPES:
    QUANT_FORMATS.register(_type)(GGMLLinear)
