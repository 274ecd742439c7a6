"""The frozen quantized linear shared by slimtune's formats (nf4.py, int8.py, packed.py).

A format subclass keeps its packed tensors as buffers (so `.to()`, `state_dict()`, DDP and
safetensors work) and implements `make(fmt, ...)` (an empty module for a QuantFormat), `_quantize(w)`,
`_empty(device)` and `_packed()`, each returning a packed-weight holder with `.dequantize(dtype)` and
`.tensors()`. A format is one such file plus `QUANT_FORMATS.register(method)` on its class: quantizing a
model, LoftQ / EoRA bases and the quantized checkpoints (`spec()` / `from_spec()`) all go through that.
`LinearDequant` dequantizes in forward
and again in backward instead of saving W: the dense weight lives only for one matmul, which is where
QLoRA's memory saving comes from.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.errors import ConfigError
from slimtune.quant.activations import fake_quantize_activations
from slimtune.quant.qformat import QuantFormat
from slimtune.technique import options_of


def packed_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Storage in bytes of a packed weight's tensors (codes + scales)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_packed_sizes(fmt: str, d: dict[str, torch.Tensor], want: dict[str, int], shape, block_size: int) -> None:
    """Raise ValueError naming the first tensor in `d` whose element count differs from `want`."""
    for k, n in want.items():
        if k not in d or d[k].numel() != n:
            got = tuple(d[k].shape) if k in d else "missing"
            raise ValueError(
                f"{fmt} tensor {k!r}: expected {n} elements for shape {tuple(shape)}, "
                f"block_size {block_size}; got {got}"
            )


def configured_format(cls, method: str, block_size: int, double_quant: bool, options=None):
    """The format object of quantized-format class `cls` for quant.method / block_size / double_quant, with the
    format's own section (options) when it declares one (a format without a section is asked without it)."""
    return cls.format_for(method, block_size, double_quant, *(() if options is None else (options,)))


class LinearDequant(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward; the dense W is never kept
    alive between the two (that is the memory saving). W gets no gradient; x (and a bias requiring
    grad, if any) do. x: (..., in), weight: any packed weight with .dequantize(dtype) -> (out, in),
    bias: (out,) or None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, bias: torch.Tensor | None):
        # only the packed holder is kept: a few references, no dense tensor
        ctx.weight, ctx.dtype, ctx.has_bias = weight, x.dtype, bias is not None
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight.dequantize(ctx.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_b


class FrozenQuantLinear(nn.Module):
    """Shared plumbing of Int8Linear / NF4Linear: packed tensors as buffers (`.to(device)`, state_dict,
    DDP and safetensors just work), a frozen bias Parameter or None, fwd/bwd through `_function`.

    x: (..., in_features) -> (..., out_features) in x.dtype, computed in `compute_dtype` if set, else
    in x.dtype; under autocast in the autocast dtype, and the output stays in it (as nn.Linear's).
    Subclasses set `format`, `_function` and implement `_quantize`, `_empty`, `_packed`.
    """

    format = "?"
    fmt = None  # the QuantFormat (kind, bits, block size, double quant) the subclass stores
    _function: type[torch.autograd.Function] = LinearDequant
    section = None
    activations = "none"  # "int8": inputs fake-quantized per token (a QAT run's qat.activations=int8)
    bnb_methods = ("nf4", "int8")  # quant.method values bitsandbytes has layers for

    # its declaration as quant.method (technique.py): a frozen, quantized base
    @classmethod
    def requires(cls, cfg) -> set[str]:
        return set() if cfg.quant.method in cls.bnb_methods else {"slimtune_format"}

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        q = cfg.quant
        fmt = configured_format(cls, q.method, q.block_size, q.double_quant, options_of(cfg, cls))
        exact = getattr(fmt, "exact_zero", False)  # a format that does not say is not trusted to keep 0
        return {"trainable_base", "full_precision_linears", "lq_lora_base"} | (set() if exact else {"exact_zero"})

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.quant.block_size <= 0:
            raise ConfigError(f"quant.block_size={cfg.quant.block_size} must be > 0")

    def _init_common(self, in_features, out_features, bias, block_size, compute_dtype, device) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.compute_dtype = block_size, compute_dtype
        # zero codes of the right sizes, so load_state_dict can fill a freshly built module
        self._set_packed(self._empty(device))
        self.register_parameter(
            "bias",
            nn.Parameter(
                torch.zeros(out_features, device=device, dtype=compute_dtype or torch.float32), requires_grad=False
            )
            if bias
            else None,
        )

    @classmethod
    def format_for(cls, name: str, block_size: int | None = None, double_quant: bool | None = None, options=None):
        """The format object (`.name` round-trips through here) for a quant.method name or a stored format
        name; the block-wise formats use QuantFormat ("nf4", "int4a-b128-dq"). options: the format's own config
        section, when it declares one (`section`). Override for other names."""
        return QuantFormat.parse(name, block_size=block_size, double_quant=double_quant)

    @classmethod
    def tensor_layout(cls, fmt, shape) -> dict[str, tuple[int, torch.dtype]]:
        """The tensors a weight of `shape` is stored in: name -> (element count, dtype) (the planner's count)."""
        return fmt.tensor_layout(shape)

    @classmethod
    def make(
        cls,
        fmt,
        in_features: int,
        out_features: int,
        bias: bool = False,
        compute_dtype: torch.dtype | None = None,
        device=None,
    ) -> "FrozenQuantLinear":
        """An empty (zero-code) module storing QuantFormat `fmt`; ValueError if the class cannot store it."""
        raise NotImplementedError

    @classmethod
    def quantize_linear(cls, linear: nn.Linear, fmt, compute_dtype: torch.dtype | None = None) -> "FrozenQuantLinear":
        """`linear` quantized to QuantFormat `fmt` on its device; its bias kept, frozen, in compute_dtype."""
        m = cls.make(fmt, linear.in_features, linear.out_features, False, compute_dtype, linear.weight.device)
        m.requantize_(linear.weight)
        m.set_bias(linear.bias)
        return m

    def set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype or bias.dtype), requires_grad=False)

    def spec(self) -> dict:
        """JSON description, enough for from_spec to rebuild the module empty (then load_state_dict)."""
        spec = {
            "class": type(self).__name__,
            "format": self.fmt.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }
        if self.activations != "none":
            spec["activations"] = self.activations
        return spec

    @classmethod
    def from_spec(cls, spec: dict, compute_dtype: torch.dtype | None) -> "FrozenQuantLinear":
        """Inverse of spec(): the empty module (load_state_dict fills it)."""
        m = cls.make(
            cls.format_for(spec["format"]), spec["in_features"], spec["out_features"], spec["bias"], compute_dtype
        )
        activations = spec.get("activations", "none")
        if activations not in ("none", "int8"):
            raise ValueError(f"activations {activations!r} is not none or int8")
        m.activations = activations
        return m

    def quantize_weight(self, w: torch.Tensor):
        """A packed-weight holder of `w` (out, in) in this module's format (the module is unchanged)."""
        return self._quantize(w)

    def set_weight(self, packed) -> None:
        """Store a holder from quantize_weight (its tensors become the buffers, no copy)."""
        self._set_packed(packed)

    def _set_packed(self, q) -> None:
        for name in [n for n in self._buffers]:
            del self._buffers[name]
        for name, t in q.tensors().items():
            self.register_buffer(name, t)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors by name: the buffers, or the views a sharding engine keeps of them
        (engines/fsdp2.shardable_quant stores them as one gathered uint8 Parameter)."""
        views = self.__dict__.get("_packed_views")
        return dict(views) if views is not None else dict(self.named_buffers(recurse=False))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight incl. scales (bias excluded)."""
        return self._packed().nbytes

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out_features, in_features) tensor of `dtype`."""
        return self._packed().dequantize(dtype)

    @torch.no_grad()
    def requantize_(self, new_weight: torch.Tensor) -> None:
        """Replace the stored codes by quantizing `new_weight` (out, in), e.g. after merging a LoRA delta
        into the base. Same format settings, so state_dict keys and sizes do not change."""
        if tuple(new_weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"requantize_: weight shape {tuple(new_weight.shape)} != ({self.out_features}, {self.in_features})"
            )
        device = next(iter(self.packed_tensors().values())).device
        self._set_packed(self._quantize(new_weight.to(device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        autocast = torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev) if autocast else (self.compute_dtype or x.dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        if self.activations == "int8":
            x = fake_quantize_activations(x)
        y = self._matmul(x.to(dtype), self._packed(), bias)
        return y if autocast else y.to(x.dtype)

    def _matmul(self, x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T + b through the format's autograd function (formats with a kernel override this)."""
        return self._function.apply(x, packed, bias)

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) casts every floating buffer, which would silently round the
        # fp32 scales. Show them to Module._apply as raw bytes so they are moved, never cast.
        scales = {k: b.dtype for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        for k in scales:
            self._buffers[k] = self._buffers[k].view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for k, dt in scales.items():
                self._buffers[k] = self._buffers[k].view(dt)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}, block_size={self.block_size}, compute_dtype={self.compute_dtype}"
        )

    # -- format hooks
    def _quantize(self, w: torch.Tensor):
        raise NotImplementedError

    def _empty(self, device):
        raise NotImplementedError

    def _packed(self):
        raise NotImplementedError
