"""Activation memory of one micro-batch: what autograd saves for backward, and the loss's working buffers.

Counted per tensor from the Llama decoder layer of transformers (RMSNorm, q/k/v/o, RoPE, SDPA, SwiGLU MLP) as
autograd sees it, with B x S tokens, compute bytes a (4 fp32; 2 under bf16 autocast) and residual-stream
bytes rb (4, or 2 when model.dtype=bfloat16 and the embedding is frozen):
  RMSNorm       its input in fp32 (4 H), rsqrt (4), and with a trainable weight the normalized input (rb H)
  a linear      a frozen or quantized one saves nothing; a trainable one (full fine-tuning) its input; LoRA's
                A saves its input (shared by q/k/v when it is in the compute dtype; else autocast casts a copy
                per module), B saves A's output (r x a); dropout > 0 adds its mask (4 x in, when the input needs a
                gradient) and the dropped copy; sparse_ft saves its input and its (rows, cols) int64 indices
  SDPA          q, k, v (GQA: kv heads not repeated), the output (a each) and the log-sum-exp (heads x 4);
                with a 4-D mask (packed documents, padding) k and v repeated to every head and the mask (S x a)
                (eager attention adds the (heads, S, S) probabilities in fp32 and the compute dtype)
  SwiGLU MLP    gate and up outputs, SiLU's output, and the product when down_proj saves its input
Layer 0 of an adapter run gets no gradient through its input (the embedding is frozen): what only that
gradient needs is not saved. A QAT run's linears (qat.method) save their fake-quantized weights instead of
autocast's copies. The chunked loss forms its gradients in forward and saves them: dh (N x H)
and, for a trainable head, dW (V x H fp32). With activation checkpointing each layer keeps only its input
(rb H) and the shared cos / sin; backward recomputes one layer at a time.
tests/plan/test_plan_components.py checks these counts against autograd's saved tensors on the tiny model.

Every count is also kept per tensor, so the platform model can tell heap-sized tensors (glibc serves those
from its heap, which fragments) from the large ones it maps and unmaps (platform.MMAP_MAX).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.engines.offload.settings import offload_active
from slimtune.plan.arch import ATTN_ROLES, MLP_ROLES, Arch
from slimtune.plan.platform import MMAP_MAX
from slimtune.plan.weights import Weights


@dataclass
class Activations:
    saved: int  # bytes autograd holds at the end of forward (layers + final norm + loss)
    saved_heap: int  # the part of `saved` in tensors under the allocator's mmap threshold
    churn_heap: int  # heap-sized bytes of what a forward would save without checkpointing (the step's churn)
    layer: int  # bytes one decoder layer saves (what a checkpointed layer's recompute holds)
    loss_forward: int  # the loss's working buffers in forward (chunk logits), on top of `saved`
    loss_backward: int  # the naive loss's softmax gradients in backward (0 for the chunked loss)
    backward: int  # working gradients of one layer's backward
    weight_copies: int  # bf16 autocast copies of trainable fp32 weights, saved for backward


def _modes(arch: Arch, weights: Weights) -> dict[str, str]:
    """Role (q_proj, ...) -> frozen | lora | sparse | train, read from decoder layer 0."""
    layer = arch.layer_linears(0)
    if arch.llama_like():
        return {role: weights.adapted.get(layer[role].name, "frozen") for role in ATTN_ROLES + MLP_ROLES}
    # another layer layout: the Llama count with the dims of its config, each role in the most common mode
    modes = [weights.adapted.get(lin.name, "frozen") for lin in layer.values()] or ["frozen"]
    common = max(set(modes), key=modes.count)
    return {role: common for role in ATTN_ROLES + MLP_ROLES}


def _consumers(
    out: list, roles, modes, width: int, x_bytes: int, a: int, dropout: bool, flowing: bool, x_saved: bool = False
) -> bool:
    """Append the per-token bytes of each tensor the linears reading one tensor x (width values per token,
    x_bytes each) save; returns whether gradients flow after them. x_saved: x is saved already (SDPA's
    output, read by o_proj)."""
    shared = False
    for role in roles:
        mode = modes[role]
        if mode == "lora" and dropout:  # the dropped copy in the compute dtype; the fp32 mask
            out += [width * a] + ([width * 4] if flowing else [])
        elif mode in ("lora", "train", "sparse"):
            if x_bytes == a:
                shared = True
            else:
                out.append(a * width)
    if shared and not x_saved:
        out.append(width * x_bytes)
    return flowing or any(modes[r] != "frozen" for r in roles)


def layer_tensors(
    arch: Arch,
    modes: dict[str, str],
    rank: int,
    a: int,
    rb: int,
    train_norms: bool,
    dropout: bool,
    seq_len: int,
    flowing: bool = True,
    masked: bool = False,
) -> list[int]:
    """Per-token bytes of each tensor one decoder layer saves; flowing: whether its input requires grad
    (layer 0 of an adapter run: no, the embedding is frozen); masked: SDPA gets a 4-D attention mask."""
    H, intermediate, d = arch.hidden, arch.intermediate, arch.head_dim
    q_dim, kv_dim = arch.heads * d, arch.kv_heads * d
    norm = [4 * H, 4] + ([rb * H] if train_norms else [])
    nd = 4 if (train_norms or rb == 4) else 2  # the norm's output dtype: promote(weight, input)
    out = list(norm) if flowing else []
    flowing = _consumers(out, ("q_proj", "k_proj", "v_proj"), modes, H, nd, a, dropout, flowing)
    if flowing:
        kv = q_dim if masked else kv_dim  # with a mask, k and v are saved repeated to every head
        out += [q_dim * a, kv * a, kv * a, q_dim * a, 4 * arch.heads]  # q, k, v, output, lse
        if masked:
            out.append(seq_len * a)  # the (B, 1, S, S) mask in the compute dtype, one per layer
        if arch.attn_impl == "eager":
            out += [arch.heads * seq_len * 4, arch.heads * seq_len * a, 2 * (q_dim - kv_dim) * a]
    flowing = _consumers(out, ("o_proj",), modes, q_dim, a, a, dropout, flowing, x_saved=flowing)
    if flowing:
        out += norm
    flowing = _consumers(out, ("gate_proj", "up_proj"), modes, H, nd, a, dropout, flowing)
    if flowing:
        out += [intermediate * a] * 3  # gate output (SiLU's input), SiLU's output, up output
    _consumers(out, ("down_proj",), modes, intermediate, a, a, dropout, flowing)
    return out + [rank * a for r in ATTN_ROLES + MLP_ROLES if modes[r] == "lora"]  # LoRA B's inputs


def _heap(sizes) -> int:
    return sum(s for s in sizes if s < MMAP_MAX)


def activations(arch: Arch, cfg, weights: Weights, device: str, batch_size: int | None = None) -> Activations:
    """Activation memory of one micro-batch of batch_size (default train.batch_size) x train.seq_len tokens."""
    t = cfg.train
    B, S = batch_size or t.batch_size, t.seq_len
    tokens, n_loss = B * S, B * (S - 1)
    full = cfg.adapter.type == "none"
    bf16 = cfg.model.dtype == "bfloat16" or (full and weights.master == 2)  # bf16 masters compute in bf16
    a = 2 if bf16 else 4
    rb = 4 if (not bf16 or (full and weights.master == 4)) else 2
    modes = _modes(arch, weights)
    # data.packing=documents / none pass position ids: cos / sin per row, and (a block with a document boundary,
    # or padding) a 4-D mask; the planner assumes a micro-batch that has one (the worst case)
    masked = cfg.data.packing in ("documents", "none")
    rank = 0 if cfg.qat.method != "none" else weights.adapter_width  # QAT + LoRA: B A is merged, not applied
    dropout = weights.adapter_dropout
    per_layer = layer_tensors(arch, modes, rank, a, rb, full, dropout, S, masked=masked)
    first = layer_tensors(arch, modes, rank, a, rb, full, dropout, S, flowing=full, masked=masked)
    H, V = arch.hidden, arch.vocab
    h_bytes = 4 if (full or rb == 4) else 2  # the final norm's output
    rope = [(B if masked else 1) * S * arch.head_dim * rb] * 2  # cos, sin (1 or B, S, d): shared by every layer
    other = [tokens * w for w in [4 * H, 4] + ([rb * H] if full else [])]  # the final norm
    other += [8 * tokens] if full else []  # the embedding's backward keeps input_ids (int64)
    other += [16 * tt.numel for tt in weights.trainable if tt.name.endswith(".deltas")]  # sparse_ft indices
    chunk = t.loss_chunk_tokens
    triton = device == "cuda" and _has_triton()
    if chunk <= 0:  # naive: logits, their fp32 log-softmax (saved) and, in backward, two N x V gradients
        # + the targets (int64), the mask and cross_entropy's 0-d total weight
        other += [n_loss * 4 * V, n_loss, 8 * n_loss, 4] + ([n_loss * H * h_bytes] if full else [])
        loss_fwd = n_loss * V * (a + (4 if bf16 else 0))
        loss_bwd = 2 * n_loss * 4 * V + (n_loss * V * 2 if bf16 else 0)
    else:  # ChunkedLinearCE: dh and dW (trainable head) formed in forward; one (chunk, V) fp32 block at a time
        # (+ its bf16 product)
        other += [n_loss * H * h_bytes, n_loss] + ([4 * V * H] if full else [])
        c = min(chunk, n_loss)
        loss_fwd = (n_loss + V) * H * 4 if triton else c * V * 4 + (c * V * 2 if bf16 else 0)
        loss_bwd = 0
    every = [tokens * w for w in first + per_layer * (arch.layers - 1)] + rope
    layers = every
    if t.activation_checkpointing:  # every layer's input, cos / sin and the bool mask, held for the recompute
        layers = [tokens * rb * H] * arch.layers + rope + ([tokens * S] if masked else [])
    # autocast's bf16 copies of the trainable fp32 linear weights (cached for the forward, saved for backward;
    # under checkpointing the cache still holds them through forward); a linear whose input needs no gradient
    # saves none: LoRA's A on q/k/v of layer 0 in an adapter run. None of bf16 masters (no cast), nor under the
    # offload engine (no autocast cache; a saved cast is swapped for a handle that loads the layer again)
    casts = bf16 and weights.master == 4 and not offload_active(cfg)
    matmul = {f"{lin.name}.weight" for lin in arch.linears if lin.name != arch.head}
    no_input_grad = (
        set()
        if full
        else {
            f"{lin.name}.lora_A.weight"
            for role, lin in arch.layer_linears(0).items()
            if role in ("q_proj", "k_proj", "v_proj")
        }
    )
    qat = cfg.qat.method != "none"  # QAT: each linear saves its fake-quantized weight instead of autocast's copy
    copies = (
        [
            2 * tt.numel
            for tt in weights.trainable
            if ((tt.name in matmul and not qat) or ".lora_" in tt.name) and tt.name not in no_input_grad
        ]
        if casts
        else []
    )
    qat_layer = sum(qat_weights(arch, a, True)) if qat else 0  # what one (recomputed) layer's linears save
    if qat and not t.activation_checkpointing:
        copies += qat_weights(arch, a, False, full)
    everything = layers + other + copies
    # backward of one layer: the residual's gradient (2 x H) and the MLP's (3 x I), in fp32 / compute dtype
    backward = tokens * (2 * 4 * H + 3 * a * arch.intermediate)
    return Activations(
        saved=sum(everything),
        saved_heap=_heap(everything),
        churn_heap=_heap(every + other + copies),
        layer=sum(per_layer) * tokens + qat_layer,
        loss_forward=loss_fwd,
        loss_backward=loss_bwd,
        backward=backward,
        weight_copies=sum(copies),
    )


def qat_weights(arch: Arch, a: int, one_layer: bool, full: bool = True) -> list[int]:
    """Bytes of the fake-quantized weights a QAT forward saves for backward (quant/qat.py), in the compute dtype
    (a): every decoder linear's, or one layer's (what a checkpointed layer's recompute holds). An adapter run's
    q/k/v of layer 0 save none (their input needs no gradient)."""
    first = (
        set() if full else {lin.name for r, lin in arch.layer_linears(0).items() if r in ("q_proj", "k_proj", "v_proj")}
    )
    sizes = [lin.numel * a for lin in arch.linears if lin.name != arch.head and lin.name not in first]
    if not one_layer:
        return sizes
    per_layer: dict = {}
    for lin in arch.linears:
        if lin.name != arch.head:
            per_layer.setdefault(lin.layer, []).append(lin.numel * a)
    return max(per_layer.values(), key=sum, default=[])


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
