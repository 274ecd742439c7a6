"""The causal-LM loss of a Hugging Face model, equal to `model(input_ids, labels=...).loss` but without the
full-sequence fp32 logits.

Naive: logits (N, V) fp32 for N = B*T tokens, plus softmax and its gradient: 3 x N x V x 4 bytes
(SmolLM2, N=1024, V=49152: ~600 MB). Here only (chunk, V) exists at any time: a plain nn.Linear head goes
through kernels/linear_cross_entropy (the Triton kernel on CUDA, ChunkedLinearCE elsewhere); other heads
(a LoRA-wrapped or quantized lm_head) recompute each chunk in backward via checkpointing.

Some families change the logits after the head inside `forward` (Gemma-2 soft-caps them, Cohere and
Granite scale them). `logit_transform(config)` reads those config attributes from one table, and
`check_head` compares the loss with the model's own on a few tokens, so a head slimtune cannot reproduce
is refused at setup instead of training on a wrong loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slimtune.errors import SlimtuneError
from slimtune.kernels import linear_cross_entropy as lce
from slimtune.kernels import linear_cross_entropy_reference as lce_reference

IGNORE = -100


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * z / softcap), or scale * z without softcap; z = lm_head(h)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


# config attribute -> its effect on the logits, as the model's forward applies it (keyed by attribute, not
# class, so every model sharing the attribute is covered). Applied in this order: scales, then the cap.
LOGIT_ATTRIBUTES = {
    "logit_scale": lambda t, v: replace(t, scale=t.scale * v),  # Cohere, Cohere2: z * logit_scale
    "logits_scaling": lambda t, v: replace(t, scale=t.scale / v),  # Granite, GraniteMoE: z / logits_scaling
    "final_logit_softcapping": lambda t, v: replace(t, softcap=v),  # Gemma-2, Gemma-3: cap * tanh(z / cap)
}


def logit_transform(config) -> LogitTransform:
    """The transform a model's forward applies to lm_head's output, from its (HF) config."""
    t = LogitTransform()
    for attr, apply in LOGIT_ATTRIBUTES.items():
        value = getattr(config, attr, None)
        if value is not None:
            t = apply(t, float(value))
    return t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    return F.cross_entropy(transform(head(h).float()), y, reduction="sum")


def lm_loss_sum(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int,
    transform: LogitTransform = LogitTransform(),
) -> torch.Tensor:
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
        return _ce_sum(head, h, y, transform)
    plain = type(head) is nn.Linear
    scale, cap = transform.scale, transform.softcap
    if plain:
        dtype = _compute_dtype(h)
        # CUDA: the fused kernel, logits never leave registers. It returns dW in the dtype it computes in,
        # so a trainable head kept in another (fp32 master) dtype takes the chunked path instead.
        if lce.use_triton(h, head.weight) and (head.weight.dtype == dtype or not head.weight.requires_grad):
            bias = head.bias.to(dtype) if head.bias is not None else None
            return lce.linear_cross_entropy(h.to(dtype), head.weight.to(dtype), y, bias, scale=scale, softcap=cap)
    if plain and torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        return lce_reference.ChunkedLinearCE.apply(
            h, head.weight, head.bias, y, chunk_tokens, _compute_dtype(h), scale, cap
        )
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, hc, yc, transform, use_reentrant=False)
        else:
            total = total + _ce_sum(head, hc, yc, transform)
    return total


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a (B, T) label batch (after the causal shift)."""
    return int((labels[:, 1:] != IGNORE).sum())


def position_kwargs(position_ids: torch.Tensor | None) -> dict:
    """Decoder kwargs for data.packing's position ids (see CausalLMLoss.forward)."""
    if position_ids is None:
        return {}
    pad = position_ids < 0
    if bool(pad.any()):
        return {"position_ids": position_ids.clamp(min=0), "attention_mask": (~pad).long()}
    return {"position_ids": position_ids}


class CausalLMLoss(nn.Module):
    """Wraps an HF causal LM so DDP sees one forward: (input_ids, labels) -> summed loss."""

    def __init__(self, model: nn.Module, chunk_tokens: int, before_head=None):
        """before_head(head module): called between the decoder and the loss (the loss reads the head's weight
        directly, without calling the module: an engine that streams weights loads it there)."""
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.transform = logit_transform(model.config)
        self.before_head = before_head

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """position_ids (data.packing): restarting at each packed document (the model then masks attention
        across documents), or -1 on padding (an attention mask is made from it)."""
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=input_ids, use_cache=False, **position_kwargs(position_ids)).last_hidden_state
        head = self.model.get_output_embeddings()
        if self.before_head is not None:
            self.before_head(head)
        return lm_loss_sum(hidden, head, labels, self.chunk_tokens, self.transform)


@torch.no_grad()
def check_head(model: nn.Module, name: str, tokens: int = 16) -> None:
    """Refuse (SlimtuneError) a model whose loss slimtune cannot reproduce: compare CausalLMLoss with the
    model's own `forward(labels=...)` loss on `tokens` seeded random tokens. Costs one short forward."""
    if not callable(getattr(model, "get_decoder", None)) or model.get_output_embeddings() is None:
        raise SlimtuneError(
            f"model.name={name!r}: {type(model).__name__} has no decoder / output head that "
            "slimtune can compute its loss from; use a causal LM (a ...ForCausalLM class)"
        )
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        want = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        got = float(CausalLMLoss(model, chunk_tokens=tokens)(ids, ids)) / count_targets(ids)
    finally:
        model.train(was_training)
    low = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    if not abs(got - want) <= (2e-2 if low else 1e-4) * max(1.0, abs(want)):
        raise SlimtuneError(
            f"model.name={name!r}: {type(model).__name__}'s forward changes its logits in a way "
            f"slimtune's loss does not reproduce (loss {got:.6g} vs the model's {want:.6g}); add its "
            "config attribute to slimtune.lm_loss.LOGIT_ATTRIBUTES"
        )
