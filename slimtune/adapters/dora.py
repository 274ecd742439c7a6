"""DoRA (Liu et al. 2024): weight-decomposed LoRA, computed as PEFT's `use_dora=True` computes it.

    W' = m * (W + s B A) / n,   n = ||W + s B A|| per output row

The magnitude m (out,) trains beside A and B and starts at n with B = 0 (= ||W||), so the wrapped model starts
equal to the base. n is detached ("treated as constant", DoRA section 4.3, as in PEFT). The forward is PEFT's
DoraLinearLayer, with y = base(x) and bias the base's bias:

    y + (m/n - 1) * (y - bias)          + (m/n) * s B A x              no dropout, or eval
    y + (m/n - 1) * (base(d(x)) - bias) + (m/n) * s B A d(x)           training with dropout d

On a quantized base (slimtune NF4 / INT-k, bitsandbytes) W is the dequantized weight, so the norm is taken of
what the forward multiplies by; the base's own forward is reused for the dropout branch (no dense W kept for
backward). Saved in PEFT's format with `use_dora: true` and `<module>.lora_magnitude_vector`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.adapters.lora import LoRALinear
from slimtune.quant import dequantize_weight, is_quantized_linear
from slimtune.registry import ADAPTERS


@ADAPTERS.register("dora")
class DoRALinear(LoRALinear):
    plan_dropout = False  # its dropout branch reruns the base's forward (plan/activations.py counts none)

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"whole_base_weight"}

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"plain_lora", "streamable"}

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, dtype=torch.float32))
        self.reset_magnitude()

    def base_weight(self) -> torch.Tensor:
        """The base's (out, in) weight in fp32, without gradient (dequantized on a quantized base)."""
        if is_quantized_linear(self.base):
            return dequantize_weight(self.base)
        return self.base.weight.detach().float()

    @torch.no_grad()
    def weight_norm(self, W: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row (fp32, detached); W: the base weight, fp32."""
        w = W + self.lora_output_weight().to(W.device)
        return torch.linalg.norm(w, dim=1)

    def lora_output_weight(self) -> torch.Tensor:
        """s B A (masked on a pruned base) as an (out, in) fp32 tensor, detached."""
        return LoRALinear.delta_weight(self).detach()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ||W + s B A||: the adapted weight equals W + s B A (PEFT's initialisation)."""
        if self.base_is_meta():  # an empty model being rebuilt (load_quantized): filled by load_state_dict
            return
        W = self.base_weight()
        self.lora_magnitude_vector.copy_(self.weight_norm(W).to(self.lora_magnitude_vector.device))

    def base_is_meta(self) -> bool:
        return any(t.is_meta for t in self.base.parameters()) or any(t.is_meta for t in self.base.buffers())

    @torch.no_grad()
    def init_factors(self, L1: torch.Tensor, L2: torch.Tensor) -> None:
        super().init_factors(L1, L2)
        self.reset_magnitude()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        xa = x.to(self.lora_A.weight.dtype)
        mag = self.lora_magnitude_vector
        scale = mag / self.weight_norm(self.base_weight().to(mag.device))  # (out,); grad flows to m only
        bias = getattr(self.base, "bias", None)
        if self.training and not isinstance(self.dropout, nn.Identity):
            xa = self.dropout(xa)
            base_out = self.base(xa.to(x.dtype))
        else:
            base_out = y
        if bias is not None:
            base_out = base_out - bias.to(base_out.dtype)
        out = (scale - 1) * base_out + scale * self.lora_output(xa)
        return y + out.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: (m / n) (W + s B A) - W (the one taken at merge() while merged)."""
        if self.merged:
            return self._merged_delta
        W = self.base_weight()
        w = W + self.lora_output_weight().to(W.device)
        m = self.lora_magnitude_vector.detach().float().to(W.device)
        return (m / torch.linalg.norm(w, dim=1))[:, None] * w - W

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector]

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """As LoRA's; the delta depends on W, so the one merged is kept for unmerge()."""
        delta = self.delta_weight()
        super().merge(safe)
        self._merged_delta = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        del self._merged_delta

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
