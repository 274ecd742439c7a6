"""Cross-entropy of logits = T(h W^T + b) without materialising the (N, V) logits (Cut Cross-Entropy,
Wijmans et al. 2024). T is a model family's logit transform: z -> softcap * tanh(scale * z / softcap)
(Gemma-2's final_logit_softcapping), or z -> scale * z (Cohere's logit_scale, Granite's 1 / logits_scaling).

Memory: the naive loss keeps logits, softmax and its gradient, 3 x N x V x 4 bytes (N = 8192 tokens,
V = 128256: 12 GB). The chunked torch reference (linear_cross_entropy_reference.py) keeps one (chunk, V) fp32
block. The Triton path keeps none: logits live only as (BLOCK_M, BLOCK_V) register tiles.
  * forward, one program per (BLOCK_M rows, vocab slice): stream over the slice's vocab tiles, each tile's
    logits computed by a loop over H; keep a running max and rescaled sum of exponentials (online
    log-sum-exp) and pick out the target logit. The few slices' (splits, N) partial LSEs are combined in
    torch; only lse (N,) fp32 is kept for backward. Slicing the vocabulary keeps the GPU busy when N is small.
  * backward, one program per (BLOCK_M rows, BLOCK_V vocab) tile: recompute the logits tile, form
    dlogits = g * (exp(logits - lse) - onehot(y)) in registers, then loop over H adding dlogits @ W[v] into dh
    and dlogits^T @ h into dW (and row sums into db) with fp32 atomic adds (N * H * V / BLOCK_V for dh: the
    price of never holding a (BLOCK_M, H) accumulator); extra memory: N x H + V x H (+ V) fp32 values.
Compute: forward 2NVH flops, backward 6NVH (logits recomputed once). Input checks (the reference file's) raise
ValueError and read shapes only; the target range is checked on CPU tensors only (a CUDA check would sync).
"""

from __future__ import annotations

import torch

from slimtune.kernels.dispatch import dot_precision, interpreting, tile_size, triton_enabled, use_triton
from slimtune.kernels.linear_cross_entropy_reference import _check, linear_cross_entropy_reference

if triton_enabled():
    import triton
    import triton.language as tl

# Tile sizes for the GPU; small problems clip them to the next power of two of the dims (tl.dot needs >= 16).
BLOCK_M, BLOCK_V, BLOCK_H = 64, 128, 64
NUM_WARPS = 8
NUM_STAGES = {torch.float32: 2}  # pipeline depth; fp32 tiles need twice the shared memory (default 3)


if triton_enabled():

    @triton.jit
    def _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rm,
        rv,
        N,
        V,
        H,
        stride_h,
        stride_w,
        scale,
        softcap,
        HAS_BIAS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """fp32 (BLOCK_M, BLOCK_V) logits T(h[rm] @ W[rv]^T (+ b[rv])); columns v >= V are -inf."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            rk = k0 + tl.arange(0, BLOCK_H)
            h = tl.load(
                h_ptr + rm[:, None].to(tl.int64) * stride_h + rk[None, :],
                mask=(rm[:, None] < N) & (rk[None, :] < H),
                other=0.0,
            )
            w = tl.load(
                w_ptr + rv[:, None].to(tl.int64) * stride_w + rk[None, :],
                mask=(rv[:, None] < V) & (rk[None, :] < H),
                other=0.0,
            )
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong: do it in fp32 there
                acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
            else:
                acc = tl.dot(h, tl.trans(w.to(h.dtype)), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rv, mask=rv < V, other=0.0).to(tl.float32)[None, :]
        acc = acc * scale
        if SOFTCAP:  # softcap * tanh(acc / softcap), tanh(u) = 1 - 2 / (exp(2u) + 1): saturates, never nan
            acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
        return tl.where(rv[None, :] < V, acc, float("-inf"))

    @triton.jit
    def _lce_forward_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        lse_ptr,
        target_ptr,
        N,
        V,
        H,
        stride_h,
        stride_w,
        tiles_per_split,
        scale,
        softcap,
        HAS_BIAS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """Program (row tile, split s) over its vocab slice: lse[s, row] = logsumexp(logits[row, slice]) and
        target[s, row] = logits[row, y] if y falls in the slice else 0. lse/target are fp32 (splits, N)."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        y = tl.load(y_ptr + rm, mask=rm < N, other=-1)
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        target = tl.zeros((BLOCK_M,), dtype=tl.float32)
        v_start = split * tiles_per_split * BLOCK_V
        for v0 in range(v_start, tl.minimum(V, v_start + tiles_per_split * BLOCK_V), BLOCK_V):
            rv = v0 + tl.arange(0, BLOCK_V)
            logits = _logits_tile(
                h_ptr,
                w_ptr,
                b_ptr,
                rm,
                rv,
                N,
                V,
                H,
                stride_h,
                stride_w,
                scale,
                softcap,
                HAS_BIAS,
                SOFTCAP,
                UPCAST,
                PRECISION,
                BLOCK_M,
                BLOCK_V,
                BLOCK_H,
            )
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))  # finite: every tile has a column v < V
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
            target += tl.sum(tl.where(rv[None, :] == y[:, None], logits, 0.0), axis=1)
        tl.store(lse_ptr + split * N + rm, run_max + tl.log(run_sum), mask=rm < N)
        tl.store(target_ptr + split * N + rm, target, mask=rm < N)

    @triton.jit
    def _lce_backward_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        lse_ptr,
        grad_ptr,
        dh_ptr,
        dw_ptr,
        db_ptr,
        N,
        V,
        H,
        stride_h,
        stride_w,
        ignore_index,
        scale,
        softcap,
        HAS_BIAS: tl.constexpr,
        SOFTCAP: tl.constexpr,
        NEED_DH: tl.constexpr,
        NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """dh += dlogits @ W, dW += dlogits^T @ h, db += sum_rows dlogits for one (rows, vocab) tile (fp32 atomics).

        dh/dw are fp32 with row strides H; grad_ptr holds the scalar d(loss)/d(row loss) (grad_out or grad_out / n)."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        y = tl.load(y_ptr + rm, mask=rm < N, other=ignore_index)
        lse = tl.load(lse_ptr + rm, mask=rm < N, other=0.0)
        row_grad = tl.where((rm < N) & (y != ignore_index), tl.load(grad_ptr), 0.0)
        logits = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rm,
            rv,
            N,
            V,
            H,
            stride_h,
            stride_w,
            scale,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            UPCAST,
            PRECISION,
            BLOCK_M,
            BLOCK_V,
            BLOCK_H,
        )
        probs = tl.exp(logits - lse[:, None])  # softmax; 0 in the padding columns (logits = -inf)
        dlogits = (probs - tl.where(rv[None, :] == y[:, None], 1.0, 0.0)) * row_grad[:, None]
        # chain rule through T: d softcap*tanh(s z / softcap) / dz = s (1 - (logit / softcap)^2); d s z / dz = s
        if SOFTCAP:  # padding columns (logits -inf) would give 0 * inf = nan: give them t = 0
            t = tl.where(rv[None, :] < V, logits / softcap, 0.0)
            dlogits = dlogits * (scale * (1.0 - t * t))
        else:
            dlogits = dlogits * scale
        if NEED_DB:
            tl.atomic_add(db_ptr + rv, tl.sum(dlogits, axis=0), mask=rv < V)
        if UPCAST:
            dl = dlogits
        else:
            dl = dlogits.to(h_ptr.dtype.element_ty)  # tensor-core operand, like the forward matmul's inputs
        for k0 in range(0, H, BLOCK_H):
            rk = k0 + tl.arange(0, BLOCK_H)
            if NEED_DH:
                w = tl.load(
                    w_ptr + rv[:, None].to(tl.int64) * stride_w + rk[None, :],
                    mask=(rv[:, None] < V) & (rk[None, :] < H),
                    other=0.0,
                )
                if UPCAST:
                    dh = tl.dot(dl, w.to(tl.float32))
                else:
                    dh = tl.dot(dl, w.to(dl.dtype), input_precision=PRECISION)
                tl.atomic_add(
                    dh_ptr + rm[:, None].to(tl.int64) * H + rk[None, :], dh, mask=(rm[:, None] < N) & (rk[None, :] < H)
                )
            if NEED_DW:
                h = tl.load(
                    h_ptr + rm[:, None].to(tl.int64) * stride_h + rk[None, :],
                    mask=(rm[:, None] < N) & (rk[None, :] < H),
                    other=0.0,
                )
                if UPCAST:
                    dw = tl.dot(tl.trans(dl), h.to(tl.float32))
                else:
                    dw = tl.dot(tl.trans(dl), h, input_precision=PRECISION)
                tl.atomic_add(
                    dw_ptr + rv[:, None].to(tl.int64) * H + rk[None, :], dw, mask=(rv[:, None] < V) & (rk[None, :] < H)
                )


def _vocab_splits(row_tiles: int, vocab_tiles: int, device: torch.device) -> tuple[int, int]:
    """(vocab tiles per forward program, number of vocab slices): enough programs for ~4 per SM when the rows
    alone are too few (N = 8192 rows in tiles of 64 is 128 programs: one per H100 SM). 2 slices on CPU, so that
    the interpreter exercises the combine."""
    want = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    splits = max(1, min(vocab_tiles, triton.cdiv(want, row_tiles)))
    per_split = triton.cdiv(vocab_tiles, splits)
    return per_split, triton.cdiv(vocab_tiles, per_split)  # no empty slice


def _launch_args(h: torch.Tensor, weight: torch.Tensor) -> dict:
    n, hidden = h.shape
    return {
        "UPCAST": interpreting() and h.dtype != torch.float32,
        "PRECISION": dot_precision(h.dtype),
        "BLOCK_M": tile_size(n, BLOCK_M),
        "BLOCK_V": tile_size(weight.shape[0], BLOCK_V),
        "BLOCK_H": tile_size(hidden, BLOCK_H),
        "num_warps": NUM_WARPS,
        "num_stages": NUM_STAGES.get(h.dtype, 3),
    }


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(h, weight, bias, targets, ignore_index, reduction, scale, softcap) -> 0-d fp32 loss, Triton
    forward/backward."""

    @staticmethod
    def forward(
        ctx,
        h,
        weight,
        bias,
        targets,
        ignore_index: int,
        reduction: str,
        scale: float = 1.0,
        softcap: float | None = None,
    ):
        h, weight = h.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        targets = targets.contiguous()
        n, hidden = h.shape
        args = _launch_args(h, weight)
        row_tiles, vocab_tiles = triton.cdiv(n, args["BLOCK_M"]), triton.cdiv(weight.shape[0], args["BLOCK_V"])
        per_split, splits = _vocab_splits(row_tiles, vocab_tiles, h.device)
        lse_part = torch.empty((splits, n), dtype=torch.float32, device=h.device)
        target_part = torch.empty((splits, n), dtype=torch.float32, device=h.device)
        _lce_forward_kernel[(row_tiles, splits)](
            h,
            weight,
            bias if bias is not None else lse_part,
            targets,
            lse_part,
            target_part,
            n,
            weight.shape[0],
            hidden,
            h.stride(0),
            weight.stride(0),
            per_split,
            float(scale),
            float(softcap or 1.0),
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap is not None,
            **args,
        )
        lse = torch.logsumexp(lse_part, dim=0)  # (N,): combine the vocab slices
        valid = targets != ignore_index
        loss = torch.where(valid, lse - target_part.sum(0), 0.0).sum()
        n_valid = valid.sum()
        if reduction == "mean":
            loss = loss / n_valid  # nan when every row is ignored, like F.cross_entropy
        ctx.save_for_backward(h, weight, bias, targets, lse, n_valid)
        ctx.ignore_index, ctx.reduction, ctx.scale, ctx.softcap = ignore_index, reduction, scale, softcap
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse, n_valid = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        n, hidden = h.shape
        vocab = weight.shape[0]
        row_grad = grad_out.float().reshape(1)
        if ctx.reduction == "mean":
            row_grad = row_grad / n_valid
        dh = torch.zeros((n, hidden), dtype=torch.float32, device=h.device) if need_dh else None
        dw = torch.zeros((vocab, hidden), dtype=torch.float32, device=h.device) if need_dw else None
        db = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_db else None
        args = _launch_args(h, weight)
        grid = (triton.cdiv(n, args["BLOCK_M"]), triton.cdiv(vocab, args["BLOCK_V"]))
        dummy = lse
        _lce_backward_kernel[grid](
            h,
            weight,
            bias if bias is not None else dummy,
            targets,
            lse,
            row_grad,
            dh if need_dh else dummy,
            dw if need_dw else dummy,
            db if need_db else dummy,
            n,
            vocab,
            hidden,
            h.stride(0),
            weight.stride(0),
            ctx.ignore_index,
            float(ctx.scale),
            float(ctx.softcap or 1.0),
            HAS_BIAS=bias is not None,
            SOFTCAP=ctx.softcap is not None,
            NEED_DH=need_dh,
            NEED_DW=need_dw,
            NEED_DB=need_db,
            **args,
        )
        return (
            dh.to(h.dtype) if need_dh else None,
            dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None,
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    scale: float = 1.0,
    softcap: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """CE(T(h W^T + b), targets) without the (N, V) logits. h (N, H), weight (V, H), targets (N,) int,
    bias (V,) or None -> 0-d fp32: the sum over non-ignored rows, or their mean (reduction="mean").
    T(z) = softcap * tanh(scale * z / softcap), or scale * z when softcap is None. Differentiable wrt h,
    weight and bias. `chunk`: rows per block of the torch reference (ignored by the kernel)."""
    _check(h, weight, bias, targets, ignore_index, reduction, scale, softcap)
    if use_triton(h, weight):
        return LinearCrossEntropyFunction.apply(h, weight, bias, targets, ignore_index, reduction, scale, softcap)
    return linear_cross_entropy_reference(h, weight, targets, bias, ignore_index, reduction, scale, softcap, chunk)
