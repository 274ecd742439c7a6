"""What a base decomposition (LQ-LoRA, and the adapter.init methods that quantize W together with LoRA
factors: LoftQ, EoRA, PiSSA) is given: the sections it reads, built by model/quantize.py from the recipe."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LowRankSetup:
    quant: object  # quant.* (QuantConfig): the base's format
    lora: object  # lora.* (LoRAConfig): rank, alpha, dropout, rslora of the factors
    lq_lora: object  # lq_lora.* (LQLoRAConfig): bits, block sizes, budget, iterations
    target_modules: object  # adapter.target_modules: the linears decomposed
