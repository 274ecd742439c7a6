"""FP8 training linear: `train.precision=fp8` and HALO (`train.precision=halo`, levels 0-2).

All three GEMMs of a linear layer run on fp8 operands with fp32 accumulation (`kernels.fp8_matmul`:
the Triton kernel on CUDA, its torch reference on CPU). X (M, K), W (N, K), E = dL/dY (M, N):

    forward   Y  = X  W^T    inner dim K     X, W in e4m3
    backward  dX = E  W      inner dim N     E in e5m2 (gradients need range), W in e4m3
              dW = E^T X     inner dim M     E in e5m2, X in e4m3

The master weight stays in its own (fp32) dtype; fp8 copies live for one GEMM.

fp8 (Transformer Engine's hybrid recipe, current scaling): one scale per tensor. The fp8 copies of X and
W made in forward are reused transposed in backward, so backward needs only the e5m2 E.

HALO (Ashkboos et al. 2025): one scale per row of each operand (per token / per channel along the inner
dim), and block Hadamard rotations H (orthonormal, symmetric, `halo.hadamard_block` wide) that spread
outliers before quantizing, placed as in the authors' code (qllmt HaloFnLevel0/1/2):
    level 0  no rotation;
    level 1  forward on (X H)(W H)^T: the rotation cancels along K;
    level 2  level 1, and dX = H (H E) W with H along the tokens of E (outlier tokens of the
             gradient are spread before quantizing, undone after the GEMM).
dW uses no rotation at any level (as HALO without its quantized FSDP). A dim that is not a multiple of
the block is zero-padded: zeros change no product and H is block diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# module references (not names): the kernel tests reload kernel modules in interpreter mode
from slimtune.kernels import fp8_matmul as fp8k
from slimtune.kernels import hadamard as hadk
from slimtune.errors import ConfigError
from slimtune.registry import PRECISIONS
from slimtune.schema import config_section, option
from slimtune.technique import Technique

HALO_LEVELS = (0, 1, 2)


def pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim of x up to a multiple of `multiple`."""
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra)) if extra else x


def rotate_last(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block Hadamard rotation along the last dim (zero-padded to the block); fp32 out."""
    return hadk.hadamard_transform(pad_last(x.float(), block), block)


def rotate_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """H x with H along the first dim (tokens), padded: (M, N) -> (M', N) fp32."""
    return rotate_last(x.t(), block).t()


def _mm(a: torch.Tensor, a_fmt: str, b: torch.Tensor, b_fmt: str, per_row: bool, out_dtype) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T with both operands quantized to fp8 (per row or per tensor)."""
    axis = -1 if per_row else None
    a8, sa = fp8k.quantize_fp8(a.contiguous(), a_fmt, axis)
    b8, sb = fp8k.quantize_fp8(b.contiguous(), b_fmt, axis)
    return fp8k.fp8_matmul(a8, sa, b8, sb, out_dtype=out_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with fp8 GEMMs. level=None: fp8 per-tensor; 0..2: HALO, per-row scales."""

    @staticmethod
    def forward(ctx, x, weight, bias, level, block, out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.level, ctx.block, ctx.x_shape, ctx.x_dtype = level, block, x.shape, x.dtype
        ctx.w_dtype, ctx.has_bias = weight.dtype, bias is not None
        if level is None:
            x8, sx = fp8k.quantize_fp8(x2, "e4m3")
            w8, sw = fp8k.quantize_fp8(weight, "e4m3")
            y = fp8k.fp8_matmul(x8, sx, w8, sw, out_dtype=torch.float32)
            ctx.save_for_backward(x8 if ctx.needs_input_grad[1] else None, sx, w8, sw)  # x8: only for dW
        else:
            a, b = (x2, weight) if level == 0 else (rotate_last(x2, block), rotate_last(weight, block))
            y = _mm(a, "e4m3", b, "e4m3", True, torch.float32)
            ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        e = grad_y.reshape(-1, grad_y.shape[-1])
        m = e.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.level is None:
            x8, sx, w8, sw = ctx.saved_tensors
            e8, se = fp8k.quantize_fp8(e, "e5m2")
            if ctx.needs_input_grad[0]:  # E (M, N) @ (W^T (K, N))^T
                grad_x = fp8k.fp8_matmul(e8, se, w8.t().contiguous(), sw, out_dtype=torch.float32)
            if ctx.needs_input_grad[1]:  # E^T (N, M) @ (X^T (K, M))^T
                grad_w = fp8k.fp8_matmul(e8.t().contiguous(), se, x8.t().contiguous(), sx, out_dtype=torch.float32)
        else:
            x2, weight = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                if ctx.level == 2:
                    he = rotate_rows(e, ctx.block)  # (M', N): H along tokens
                    grad_x = rotate_rows(_mm(he, "e5m2", weight.t(), "e4m3", True, torch.float32), ctx.block)[:m]
                else:
                    grad_x = _mm(e, "e5m2", weight.t(), "e4m3", True, torch.float32)
            if ctx.needs_input_grad[1]:
                grad_w = _mm(e.t(), "e5m2", x2.t(), "e4m3", True, torch.float32)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = e.float().sum(0).to(ctx.w_dtype)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.w_dtype)
        return grad_x, grad_w, grad_b, None, None, None


class TrainingLinear(nn.Linear):
    """Base of the low-precision training linears (FP8Linear, quartet.QuartetLinear): an nn.Linear built
    around an existing linear's own Parameters, whose matmuls run through `_run(x, out_dtype)` outside
    autocast. Output dtype: the autocast dtype under autocast, else x's dtype."""

    @classmethod
    def _share(cls, linear: nn.Linear) -> "TrainingLinear":
        """A module holding `linear`'s Parameters (no copy): optimizers and state_dicts see the same tensors."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            return self._run(x, out_dtype)

    def _run(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class FP8Linear(TrainingLinear):
    """nn.Linear whose matmuls run in fp8 (same parameters and state_dict keys as nn.Linear).

    level=None: plain fp8 (per-tensor scales); 0, 1, 2: HALO levels with `block`-wide rotations."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        level: int | None = None,
        block: int = 128,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_mode(level, block)

    def _set_mode(self, level: int | None, block: int) -> None:
        if level is not None and level not in HALO_LEVELS:
            raise ValueError(f"HALO level {level!r}: use one of {HALO_LEVELS}")
        if block < 2 or block & (block - 1) or block > 256:
            raise ValueError(f"hadamard block {block}: use a power of two in [2, 256]")
        self.level, self.block = level, block

    @classmethod
    def from_linear(cls, linear: nn.Linear, level: int | None = None, block: int = 128) -> "FP8Linear":
        m = cls._share(linear)
        m._set_mode(level, block)
        return m

    def _run(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.bias, self.level, self.block, out_dtype)

    def extra_repr(self) -> str:
        kind = "fp8" if self.level is None else f"halo{self.level}, block={self.block}"
        return f"{super().extra_repr()}, {kind}"


@config_section("halo", fixed=True)
@dataclass(frozen=True)
class HaloConfig:
    """train.precision=halo's options."""

    level: int = option("0 no rotation | 1 forward | 2 forward + input gradient", 2, (0, 1, 2))
    hadamard_block: int = option("Hadamard block (power of two <= 256; reduced to what divides each dim)", 128)


def largest_block(dim: int, block: int) -> int:
    """The largest power of two <= block that divides dim (1 when dim is odd)."""
    return min(block, dim & -dim)


class PrecisionSwap(Technique):
    """A train.precision technique: low-precision linears made from the base's full-precision ones."""

    section = None

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"full_precision_linears"}

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"whole_base_weight", "streamable"}


@PRECISIONS.register("fp8")
class FP8Precision(PrecisionSwap):
    section = None

    @staticmethod
    def swap(linear: nn.Linear, options) -> nn.Module:
        return FP8Linear.from_linear(linear)


@PRECISIONS.register("halo")
class HaloPrecision(PrecisionSwap):
    section = "halo"

    @staticmethod
    def swap(linear: nn.Linear, options: HaloConfig) -> nn.Module:
        # rotations along K need a block dividing in_features, level 2's along tokens are padded
        block = max(2, largest_block(linear.in_features, options.hadamard_block))
        return FP8Linear.from_linear(linear, options.level, block)

    @classmethod
    def validate(cls, cfg) -> None:
        b = cfg.halo.hadamard_block
        if not 2 <= b <= 256 or b & (b - 1):
            raise ConfigError(f"halo.hadamard_block={b} must be a power of two in [2, 256]")
