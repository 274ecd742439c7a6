"""Block-wise NF4 (QLoRA's 4-bit NormalFloat, Dettmers et al. 2023) in pure torch, so a quantized base
runs on any device torch runs on.

Format (bitsandbytes-compatible codes and scales):
  * the weight is flattened row-major and cut into blocks of `block_size` values;
  * each block stores its absmax (fp32) and, per value, the index (0..15) of the NF4 codebook entry
    nearest to value / absmax; two indices per byte, the first value in the high nibble (bnb's order).
  * double quantization (QLoRA) stores the absmax values as int8: (absmax - mean) is quantized
    symmetrically in blocks of 256 scales with one fp32 scale per 256-block, plus the fp32 mean.
Storage per weight: 4 + 32/64 = 4.5 bits, or ~4.127 bits with double quantization (blocks of 64).

Double-quantized scales use a linear int8 grid, not bnb's 8-bit dynamic map, so with double_quant
the scales (not the codes) differ from bnb's by up to half an int8 step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimtune.kernels import nf4_matmul as nf4_kernel
from slimtune.kernels.nf4_matmul import NF4Operand
from slimtune.quant.qformat import QuantFormat
from slimtune.errors import ConfigError
from slimtune.registry import QUANT_FORMATS
from slimtune.quant.linear import FrozenQuantLinear, LinearDequant, check_packed_sizes, packed_nbytes
from slimtune.quant.scales import DQ_BLOCK, double_dequantize, double_quant_sizes, double_quantize

# QLoRA paper appendix E == bitsandbytes.functional.get_4bit_type("nf4")
NF4_CODEBOOK = torch.tensor(
    [
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
    ],
    dtype=torch.float32,
)
# nearest-value rounding == bucketize against the midpoints between neighbouring code values
_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
# byte -> (value of high nibble, value of low nibble): dequantization is one lookup per byte
_PAIR_LUT = torch.stack([NF4_CODEBOOK[torch.arange(256) >> 4], NF4_CODEBOOK[torch.arange(256) & 15]], dim=1)


@functools.lru_cache(maxsize=8)  # a few devices at most; bounded so a long-lived process cannot grow it
def _on_device(table: str, device: torch.device) -> torch.Tensor:
    """NF4_CODEBOOK or _PAIR_LUT on `device`, copied there once (not per forward)."""
    if table == "pair_lut64":  # each (high, low) fp32 pair as one 8-byte element: a 1-D gather, ~2x faster
        return _PAIR_LUT.contiguous().view(torch.float64).view(-1).to(device)  # than embedding's row copies
    return {"codebook": NF4_CODEBOOK, "pair_lut": _PAIR_LUT}[table].to(device)


def _check_layout(shape, block_size: int) -> int:
    numel = int(torch.Size(shape).numel())
    if block_size <= 0 or block_size % 2:
        raise ValueError(
            f"NF4 block_size must be a positive even number (2 codes per byte), got {block_size} "
            f"for weight shape {tuple(shape)}"
        )
    if numel == 0 or numel % block_size:
        raise ValueError(
            f"NF4 needs numel divisible by block_size={block_size}; weight shape {tuple(shape)} has {numel} elements"
        )
    return numel


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (n,) in 0..15, n even -> uint8 (n/2,): element 2i in the high nibble, 2i+1 in the low."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (n/2,) -> uint8 codes (n,) in original order (inverse of pack_codes)."""
    return torch.stack([packed >> 4, packed & 15], dim=1).flatten()


@dataclass
class NF4Weight:
    """A packed NF4 weight. Tensors (n = numel, nb = n / block_size):
    codes uint8 (n/2,); absmax fp32 (nb,) or, double-quantized, absmax_q int8 (nb,) +
    absmax_scale fp32 (ceil(nb/256),) + absmax_offset fp32 (1,)."""

    codes: torch.Tensor
    shape: tuple
    block_size: int = 64
    absmax: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    def block_absmax(self) -> torch.Tensor:
        """fp32 (nb,): the per-block scales (reconstructed from int8 when double-quantized)."""
        if not self.double_quant:
            return self.absmax.float()
        return double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> `shape` tensor of `dtype` (computed in fp32, then cast once)."""
        # int32 indices (not int64) and an in-place scale keep the transient memory near one fp32 copy
        pairs = torch.index_select(_on_device("pair_lut64", self.codes.device), 0, self.codes.view(-1).int())
        w = pairs.view(torch.float32).view(-1, self.block_size).mul_(self.block_absmax()[:, None])  # (n,) fp32
        return w.view(self.shape).to(dtype)

    def operand(self) -> NF4Operand:
        """The same tensors (no copy) as the nf4_matmul kernel's plain-tensor operand."""
        return NF4Operand(
            self.codes,
            _on_device("codebook", self.codes.device),
            tuple(self.shape),
            self.block_size,
            self.absmax,
            self.absmax_q,
            self.absmax_scale,
            self.absmax_offset,
            DQ_BLOCK,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (safetensors-ready; names match NF4Linear's buffers)."""
        names = ("absmax_q", "absmax_scale", "absmax_offset") if self.double_quant else ("absmax",)
        return {"codes": self.codes, **{k: getattr(self, k) for k in names}}

    @property
    def nbytes(self) -> int:
        """Storage in bytes: packed codes + scales."""
        return packed_nbytes(self.tensors())

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], shape, block_size: int = 64) -> "NF4Weight":
        """Inverse of tensors(); validates the sizes against shape / block_size."""
        numel = _check_layout(shape, block_size)
        nb = numel // block_size
        want = {"codes": numel // 2}
        want.update(double_quant_sizes(nb, "absmax") if "absmax_q" in d else {"absmax": nb})
        check_packed_sizes("NF4", d, want, shape, block_size)
        return cls(shape=tuple(shape), block_size=block_size, **{k: d[k] for k in want})


def _double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp32 (nb,) -> absmax_q int8 (nb,), absmax_scale fp32 (ceil(nb/256),), absmax_offset fp32 (1,)
    (scales.double_quantize with NF4's tensor names)."""
    return double_quantize(absmax, prefix="absmax")


def _empty_nf4(shape, block_size: int, double_quant: bool, device=None) -> NF4Weight:
    """All-zero NF4Weight of the sizes quantize_nf4 would produce, without a full-precision temporary."""
    nb = _check_layout(shape, block_size) // block_size
    z = lambda n, dt: torch.zeros(n, dtype=dt, device=device)  # noqa: E731
    scales = (
        {
            "absmax_q": z(nb, torch.int8),
            "absmax_scale": z(-(-nb // DQ_BLOCK), torch.float32),
            "absmax_offset": z(1, torch.float32),
        }
        if double_quant
        else {"absmax": z(nb, torch.float32)}
    )
    return NF4Weight(codes=z(nb * block_size // 2, torch.uint8), shape=tuple(shape), block_size=block_size, **scales)


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """w: any shape with numel % block_size == 0 (any float dtype; computed in fp32) -> NF4Weight."""
    _check_layout(w.shape, block_size)
    blocks = w.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():  # nan/inf would silently poison a whole block
        raise ValueError(f"cannot NF4-quantize a weight of shape {tuple(w.shape)} with non-finite values")
    # all-zero blocks: divide by 1 instead of 0; every value then maps to code 7 (== 0.0)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = torch.bucketize(scaled, _MIDPOINTS.to(w.device)).to(torch.uint8).flatten()
    scales = _double_quantize(absmax) if double_quant else {"absmax": absmax}
    return NF4Weight(codes=pack_codes(codes), shape=tuple(w.shape), block_size=block_size, **scales)


class LinearNF4(LinearDequant):
    """LinearNF4.apply(x, nf4_weight, bias): y = x W^T + b, W dequantized from NF4 in forward and again in
    backward, never kept alive in between (QLoRA's memory saving). Only x (and a bias requiring grad)
    get gradients. x: (..., in), nf4_weight: NF4Weight of shape (out, in), bias: (out,) or None."""


@QUANT_FORMATS.register("nf4")
class NF4Linear(FrozenQuantLinear):
    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.quant.block_size % 2:
            raise ConfigError(f"quant.block_size={cfg.quant.block_size} must be even for nf4 (2 codes per byte)")

    """Frozen NF4 linear (QLoRA's base layer). x: (..., in_features) -> (..., out_features) in x.dtype.

    Buffers: codes uint8 (out*in/2,) and absmax fp32, or absmax_q/absmax_scale/absmax_offset when
    double-quantized; bias: frozen Parameter or None. Computes in compute_dtype if set, else x.dtype.
    """

    format = "nf4"
    _function = LinearNF4

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        _check_layout((out_features, in_features), block_size)
        self.double_quant = double_quant
        self.fmt = QuantFormat("nf", 4, block_size, double_quant)
        self._init_common(in_features, out_features, bias, block_size, compute_dtype, device)

    @classmethod
    def make(cls, fmt, in_features, out_features, bias=False, compute_dtype=None, device=None) -> "NF4Linear":
        if (fmt.kind, fmt.bits) != ("nf", 4):
            raise ValueError(f"NF4Linear stores nf4, not {fmt.name}")
        return cls(in_features, out_features, bias, fmt.block_size, fmt.double_quant, compute_dtype, device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "NF4Linear":
        """Quantize `linear`'s weight on its device; the bias is kept (frozen) in compute_dtype or its own."""
        return cls.quantize_linear(linear, QuantFormat("nf", 4, block_size, double_quant), compute_dtype)

    def _quantize(self, w: torch.Tensor) -> NF4Weight:
        return quantize_nf4(w, self.block_size, self.double_quant)

    def _empty(self, device) -> NF4Weight:
        return _empty_nf4((self.out_features, self.in_features), self.block_size, self.double_quant, device)

    def _packed(self) -> NF4Weight:
        """The buffers viewed as an NF4Weight (shares storage, no copy)."""
        return NF4Weight(
            shape=(self.out_features, self.in_features), block_size=self.block_size, **self.packed_tensors()
        )

    def _matmul(self, x: torch.Tensor, packed: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        """On CUDA (or forced by SLIMTUNE_KERNELS) the Triton kernel dequantizes W tile by tile in
        registers, forward and backward; elsewhere LinearNF4 dequantizes W whole, per matmul."""
        if self.in_features % 2 == 0 and nf4_kernel.use_triton(x, packed.codes):  # the kernel reads code pairs
            return nf4_kernel.NF4MatmulFunction.apply(x, packed.operand(), bias)
        return super()._matmul(x, packed, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", double_quant={self.double_quant}"
