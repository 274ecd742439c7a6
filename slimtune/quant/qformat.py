"""QuantFormat: the name and layout of a block-wise low-bit format, e.g. "nf3-b64-dq", "int4a-b128", "nf4-b64".

kind ("nf" | "int" | "int_asym"), bits, block size and double quantization; `tensor_layout` gives the tensors
PackedLinear (packed.py) stores for it. NF4Linear and Int8Linear are described by the same names ("nf4-b64-dq",
"int8-b64"), which is how quantized checkpoints record every module's format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from slimtune.quant.intk import INT_BITS
from slimtune.quant.nfk import NF_BITS
from slimtune.quant.packing import packed_len
from slimtune.quant.scales import double_quant_sizes

KINDS = {"nf": NF_BITS, "int": INT_BITS, "int_asym": INT_BITS}  # kind -> valid bits
_NAME_RE = re.compile(r"(nf|int)(\d+)(a?)(?:-b(\d+))?(-dq)?")
_VALID_NAMES = (
    "nf2..nf8, int2..int8 (symmetric), int2a..int8a (asymmetric), optionally followed by "
    "-b<block_size> and -dq, e.g. 'nf3', 'int4a-b128', 'nf3-b64-dq'"
)


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
    def exact_zero(self) -> bool:
        """Whether 0 quantizes to exactly 0 (NF-k grids hold 0, symmetric INT-k a zero level; asymmetric INT-k
        spans [min, max] of each block): a pruned base stays sparse only in such a format."""
        return self.kind != "int_asym"

    @property
    def name(self) -> str:
        """E.g. "nf3-b64", "int4a-b128-dq"; QuantFormat.parse(fmt.name) == fmt."""
        prefix = "nf" if self.kind == "nf" else "int"
        suffix = "a" if self.kind == "int_asym" else ""
        return f"{prefix}{self.bits}{suffix}-b{self.block_size}" + ("-dq" if self.double_quant else "")

    @classmethod
    def parse(
        cls, name: str | QuantFormat, block_size: int | None = None, double_quant: bool | None = None
    ) -> QuantFormat:
        """ "nf3" / "int4a-b128" / "nf3-b64-dq" (or a QuantFormat) -> QuantFormat. Short names default to
        block_size=64, double_quant=False; the keyword arguments, when not None, override the name."""
        if isinstance(name, QuantFormat):
            fmt = name
        else:
            m = _NAME_RE.fullmatch(name.strip().lower()) if isinstance(name, str) else None
            if m is None:
                raise ValueError(f"unknown quantization format {name!r}; valid: {_VALID_NAMES}")
            prefix, bits, asym, block, dq = m.groups()
            if prefix == "nf" and asym:
                raise ValueError(
                    f"unknown quantization format {name!r} (NF has no asymmetric variant); valid: {_VALID_NAMES}"
                )
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
            raise ValueError(
                f"{self.name} needs numel divisible by block_size={self.block_size}; weight shape "
                f"{tuple(shape)} has {numel} elements"
            )
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
