"""The torch reference of linear_cross_entropy.py's kernel: CE(T(h W^T + b), targets) computed one (chunk, V) fp32
block of logits at a time, dh and dW formed in the forward pass (Liger-Kernel's trick) so that backward is a
multiply; and the input checks both paths share."""

from __future__ import annotations

import torch

REFERENCE_CHUNK_BYTES = 256 * 2**20  # fp32 (chunk, V) logits block of the torch reference
REDUCTIONS = ("sum", "mean")


def _check(h, weight, bias, targets, ignore_index, reduction, scale, softcap) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}, use one of {REDUCTIONS}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: h (N, H) and weight (V, H), got {tuple(h.shape)} and {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets must be ({h.shape[0]},), got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not scale > 0 or (softcap is not None and not softcap > 0):
        raise ValueError(f"linear_cross_entropy: scale={scale} and softcap={softcap} must be > 0")
    if not targets.is_cuda:  # free on CPU; on CUDA this check would wait for the GPU on every call
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"linear_cross_entropy: targets out of range [0, {weight.shape[0]}) (ignore_index={ignore_index})"
            )


class ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(T(h_i W^T + b), y_i) over rows, `chunk` rows at a time, computing in `dtype` with fp32
    logits. h: (N, H), W: (V, H), b: (V,) or None, y: (N,) (no ignored rows) -> 0-d fp32.

    The gradients wrt h, W and b are formed chunk by chunk during forward; backward only scales them.
    """

    @staticmethod
    def forward(
        ctx, h, weight, bias, y, chunk: int, dtype: torch.dtype, scale: float = 1.0, softcap: float | None = None
    ):
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, yc = h[s : s + chunk].to(dtype), y[s : s + chunk]
                logits = (hc @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                if scale != 1.0:
                    logits.mul_(scale)
                if softcap is not None:  # keep tanh (the chain-rule factor is 1 - tanh^2)
                    tanh = logits.div_(softcap).tanh_()
                    logits = tanh * softcap
                # log-sum-exp and softmax in place in the (chunk, V) fp32 buffer
                target = logits.gather(1, yc[:, None]).squeeze(1)
                top = logits.amax(dim=-1)
                probs = logits.sub_(top[:, None]).exp_()
                sumexp = probs.sum(dim=-1)
                total += (top + sumexp.log() - target).sum()
                # d(sum CE)/d logits = softmax - onehot, then through T
                dlogits = probs.div_(sumexp[:, None])
                dlogits[rows[: len(yc)], yc] -= 1.0
                if softcap is not None:
                    dlogits.mul_(tanh.square_().neg_().add_(1.0))
                if scale != 1.0:
                    dlogits.mul_(scale)
                grad_h[s : s + chunk] = (dlogits.to(dtype) @ w).to(h.dtype)
                if need_w:  # in place: `grad_w += dlogits.T @ hc` would hold a second (V, H) fp32 temporary
                    grad_w.addmm_(dlogits.T, hc.float())
                if need_b:
                    grad_b += dlogits.sum(0)
                del logits, probs, dlogits  # else the next chunk's logits are formed while these are held
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # scaled in place (the buffers are this function's own and backward runs once): a (V, H) fp32 copy
        # of the head's gradient would double its memory at the peak of a step
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h.mul_(grad_out.to(grad_h.dtype))
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        gb = grad_b.mul_(grad_out).to(ctx.weight_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None


def linear_cross_entropy_reference(
    h,
    weight,
    targets,
    bias=None,
    ignore_index: int = -100,
    reduction: str = "sum",
    scale: float = 1.0,
    softcap: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Chunked torch path: ignored rows dropped, then ChunkedLinearCE (one (chunk, V) fp32 block at a time;
    default chunk: REFERENCE_CHUNK_BYTES of logits). Computes in h's dtype (the autocast dtype if enabled)."""
    keep = targets != ignore_index
    n_valid = keep.sum()
    if not bool(n_valid):
        zero = h.sum() * 0.0 + weight.sum() * 0.0 + (bias.sum() * 0.0 if bias is not None else 0.0)
        return zero.float() / 0.0 if reduction == "mean" else zero.float()
    chunk = chunk or max(1, REFERENCE_CHUNK_BYTES // (4 * weight.shape[0]))
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    loss = ChunkedLinearCE.apply(h[keep], weight, bias, targets[keep], chunk, dtype, scale, softcap)
    return loss / n_valid if reduction == "mean" else loss
