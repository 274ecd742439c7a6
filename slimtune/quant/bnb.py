"""The bitsandbytes backend: bnb's Linear4bit (nf4) and Linear8bitLt (int8) as the frozen base.

bitsandbytes >= 0.45 quantizes and runs both on CPU. It is imported lazily (inside functions) so
slimtune works without it. CPU behaviour verified with bitsandbytes 0.50.2 (forward, and backward
wrt the input, for fp32 / bf16 inputs):

* Linear4bit: on CPUs with AVX512-BF16, an eval-mode forward on an input that does not require grad
  repacks the weight *in place* into a CPU-only layout (`quant_state.packing_format_for_cpu`); from
  then on every CPU forward takes `gemv_4bit`, which has no autograd, so a later training forward
  silently gives no gradient wrt the input (LoRA factors below it would stop learning), and
  `dequantize_4bit` no longer reads the weight. `to_bnb_linear` turns that repacking off;
  `dequantize_bnb_weight` undoes it on layers built elsewhere (as bnb's own state_dict saving does).
* Linear8bitLt (has_fp16_weights=False): in train mode bnb dispatches CPU inputs to MatMul8bitFp
  (dequantize the int8 weight, fp matmul: matches F.linear(x, W_deq) to fp32 rounding, and it saves
  the full input for backward); in eval mode to MatMul8bitLt (LLM.int8: inputs cast to fp16 and
  row-quantized to int8, ~0.5% relative output error, one UserWarning). Backward wrt the input works
  in both. Its scales are one absmax per output row (`block_size` / `double_quant` do not apply), and
  bnb quantizes the weight via fp16, so |w| must stay below 65504.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from slimtune.registry import BACKENDS
from slimtune.technique import Technique

_MISSING = "quant.backend=bitsandbytes needs bitsandbytes: pip install bitsandbytes"


def _import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(_MISSING) from None
    return bnb


@torch.no_grad()
def to_bnb_linear(
    linear: nn.Linear,
    method: str,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight, quantized now (on CPU, then moved to linear's device).

    method "nf4": bnb.nn.Linear4bit(quant_type="nf4", blocksize=block_size, compress_statistics=double_quant),
    computing in compute_dtype. method "int8": bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold=0),
    computing in the input's dtype. The bias (if any) is copied, frozen, in compute_dtype.
    """
    bnb = _import_bnb()
    if method not in ("nf4", "int8"):
        raise ValueError(f"bitsandbytes backend supports methods nf4, int8; got {method!r}")
    device = linear.weight.device
    has_bias = linear.bias is not None
    # bnb quantizes a parameter when it is moved from CPU to a real device; building on "meta" avoids
    # allocating (and random-initialising) a second full-precision weight.
    w = linear.weight.detach().to("cpu")
    if method == "nf4":
        m = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        m.weight = bnb.nn.Params4bit(
            w.to(compute_dtype),
            requires_grad=False,
            quant_type="nf4",
            blocksize=block_size,
            compress_statistics=double_quant,
            module=m,
        )
        m.support_avx512bf16_for_cpu = False  # see the module docstring: keeps backward and dequantization
    else:
        m = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta"
        )
        m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        m.bias = nn.Parameter(linear.bias.detach().to("cpu", compute_dtype), requires_grad=False)
    m = m.to("cpu")  # quantizes here (Params4bit / Int8Params .to on a CPU tensor)
    return m if device.type == "cpu" else m.to(device)


def is_bnb_linear(module: nn.Module) -> bool:
    """True for bnb Linear4bit / Linear8bitLt. Never imports bitsandbytes: if nobody has imported it,
    no module can be one of its layers."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


@torch.no_grad()
def dequantize_bnb_weight(module: nn.Module) -> torch.Tensor:
    """fp32 (out_features, in_features) weight of a bnb Linear4bit / Linear8bitLt, as its matmul sees it."""
    bnb = _import_bnb()
    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = w.quant_state
        if state is None:  # not quantized yet (never moved to a device)
            return w.data.float()
        if getattr(state, "packing_format_for_cpu", False):
            # undo bnb's AVX512-BF16 CPU repacking first (its scales were rounded to bf16 by it)
            w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, state)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        if w.dtype != torch.int8:  # has_fp16_weights=True or not quantized yet
            return w.data.float()
        # before the first forward the scales live on the weight, afterwards on module.state
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        # same expression as bnb's MatMul8bitFp, so this is bit-exactly the weight its fp32 matmul uses
        return w.data.to(torch.float32).mul_(scb.float().unsqueeze(1).mul(1.0 / 127.0))
    raise TypeError(f"not a bitsandbytes linear: {type(module).__name__}")


@BACKENDS.register("bitsandbytes")
class BitsandbytesBackend(Technique):
    """quant.backend=bitsandbytes: bnb's Linear4bit (nf4) / Linear8bitLt (int8) as the frozen base."""

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"slimtune_format", "streamable"}

    @staticmethod
    def storage_bytes(quant, numel: int, out_features: int) -> int:
        """Bytes of one weight (bias aside), for the planner: Linear4bit packs two codes a byte plus its absmax
        (fp32, or uint8 + one fp32 per 256 when double-quantized); Linear8bitLt int8 codes + an fp32 per row."""
        if quant.method == "nf4":
            nb = -(-numel // quant.block_size)
            return numel // 2 + (nb + 4 * (-(-nb // 256) + 1) if quant.double_quant else 4 * nb)
        return numel + 4 * out_features
