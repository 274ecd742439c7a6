"""Causal-LM loss without the full-sequence fp32 logits.

Naive: logits (N, V) fp32 for N = B*T tokens, plus softmax and its gradient: 3 x N x V x 4 bytes
(SmolLM2, N=1024, V=49152: ~600 MB). Chunked: only (chunk, V) exists at any time, and for a plain
nn.Linear head the gradients wrt hidden and head weight are computed during the forward pass
(Liger-Kernel's trick), so backward needs no second pass over the vocabulary.
Other heads (e.g. a LoRA-wrapped lm_head) recompute each chunk in backward via checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i) over rows, chunk rows at a time. h: (N, H), W: (V, H), y: (N,)."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk: int, dtype: torch.dtype):
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, yc = h[s : s + chunk].to(dtype), y[s : s + chunk]
                logits = (hc @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                # log-sum-exp and softmax in place in the one (chunk, V) fp32 buffer: no second copy
                target = logits.gather(1, yc[:, None]).squeeze(1)
                top = logits.amax(dim=-1)
                probs = logits.sub_(top[:, None]).exp_()
                sumexp = probs.sum(dim=-1)
                total += (top + sumexp.log() - target).sum()
                # d(sum CE)/d logits = softmax - onehot
                dlogits = probs.div_(sumexp[:, None])
                dlogits[torch.arange(len(yc), device=h.device), yc] -= 1.0
                grad_h[s : s + chunk] = (dlogits.to(dtype) @ w).to(h.dtype)
                if need_w:
                    grad_w += dlogits.T @ hc.float()
                if need_b:
                    grad_b += dlogits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.weight_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def _ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def lm_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token CE. hidden: (B, T, H) final hidden states; labels: (B, T) with IGNORE.

    Returns a 0-d fp32 tensor: the sum over predicted tokens (divide by the token count yourself, so
    that micro-batches and ranks can share one denominator).
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # masked (prompt) tokens never reach the vocabulary matmul
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    if chunk_tokens <= 0:
        return _ce_sum(head, h, y)
    plain = type(head) is nn.Linear
    if plain:
        from slimtune.kernels import linear_cross_entropy as lce  # lazy: the kernel imports this module

        dtype = _compute_dtype(h)
        # CUDA: the fused kernel, logits never leave registers. It returns dW in the dtype it computes in,
        # so a trainable head kept in another (fp32 master) dtype takes the chunked path instead.
        if lce.use_triton(h, head.weight) and (head.weight.dtype == dtype or not head.weight.requires_grad):
            bias = head.bias.to(dtype) if head.bias is not None else None
            return lce.linear_cross_entropy(h.to(dtype), head.weight.to(dtype), y, bias)
    if plain and torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        return ChunkedLinearCE.apply(h, head.weight, head.bias, y, chunk_tokens, _compute_dtype(h))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, hc, yc, use_reentrant=False)
        else:
            total = total + _ce_sum(head, hc, yc)
    return total


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a (B, T) label batch (after the causal shift)."""
    return int((labels[:, 1:] != IGNORE).sum())


class CausalLMLoss(nn.Module):
    """Wraps an HF causal LM so DDP sees one forward: (input_ids, labels) -> summed loss."""

    def __init__(self, model: nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        return lm_loss_sum(hidden, self.model.get_output_embeddings(), labels, self.chunk_tokens)
