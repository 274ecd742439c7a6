"""Low-rank factors beside quantized sparse values: `slimtune export SRC --format sparse-nf4 --rank R`.

LQ-LoRA's alternation (Guo et al., 2023) restricted to a pruned matrix's kept entries, the "sparse + quantized
+ low-rank" layout of SLiM (Mozaffari et al., 2024). With the keep-mask M and the quantizer q of the format's
kept values:
    Q <- q(kept values of W - M * L)
    L <- the best rank-R approximation of M * (W - Q)          (truncated SVD; L = L1 @ L2)
from L = 0, for ITERS rounds, keeping the round with the smallest ||M * (W - Q - L)||_F. The loaded weight is
Q + M * (L1 L2): the factors are a LoRA adapter (scaling 1) whose update is masked, so pruned weights stay
exactly 0 and the sparse pattern is what the manifest says. Since M * (W - Q) is 0 off the mask, the masked
error is never above the error without factors (round 0). The factors can be trained further:
`slimtune run lora model.name=EXPORT` trains the adapter it finds, as for an LQ-LoRA checkpoint.
"""

from __future__ import annotations

import torch

ITERS = 5


def quantize_kept(values: torch.Tensor, codec: str) -> torch.Tensor:
    """The kept values (1-D) as the format stores them: quantized and dequantized (fp32)."""
    from slimtune.formats.compressed import _decode_values, _encode_values

    entries, record = _encode_values(values, codec, "v")
    return _decode_values({k.removeprefix("v."): v for k, v in entries.items()}, record, torch.float32)


def _best_rank(e: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 (out, r), L2 (r, in)) with L1 @ L2 the best rank-r approximation of e (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def decompose(w: torch.Tensor, keep: torch.Tensor, codec: str, rank: int, iters: int = ITERS) -> dict:
    """w (out, in) with zeros off `keep`. Returns the values to store (W - M * L1 L2 on the kept positions,
    to be quantized by the format), the factors, and the masked relative error without and with them."""
    w, keep_f = w.float(), keep.float()
    norm = w.norm().clamp(min=1e-12)
    l1, l2 = torch.zeros(w.shape[0], rank), torch.zeros(rank, w.shape[1])
    best, error_without = None, None
    for i in range(iters + 1):
        low = l1 @ l2
        target = w - keep_f * low
        q = torch.zeros_like(w)
        q[keep] = quantize_kept(target[keep], codec)
        err = float((keep_f * (w - q - low)).norm() / norm)
        error_without = err if i == 0 else error_without
        if best is None or err < best["error"]:
            best = {"values": target, "L1": l1, "L2": l2, "error": err}
        if i < iters:
            l1, l2 = _best_rank(keep_f * (w - q), rank)
    return {**best, "error_without": error_without}
