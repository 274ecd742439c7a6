"""SpIEL's op: y = x S^T for a sparse (out, in) S given as (rows, cols, values), without building S on the
gather path, with growth statistics observed in backward (adapters/sparse_ft_regrow.py)."""

from __future__ import annotations

import torch

from slimtune.adapters.sparse_ft_regrow import CHUNK_ELEMENTS


def pick_path(tokens: int, k: int, out_features: int, in_features: int) -> str:
    """ "gather" while its (tokens x k) work is under one dense (out, in) matrix, else "dense"."""
    return "dense" if tokens * k > out_features * in_features else "gather"


def _dense_s(rows, cols, values, out_features: int, in_features: int) -> torch.Tensor:
    s = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    return s.index_put_((rows, cols), values)


class _SparseDelta(torch.autograd.Function):
    """y = x S^T with S[rows, cols] = values; x (T, in), values (k,) any float dtype, computed in x's dtype.
    The dense path builds S in forward and again in backward (never kept alive in between, like
    quant.linear.LinearDequant). `observers` get (x, dy, dense_grad or None) in backward."""

    @staticmethod
    def forward(ctx, x, rows, cols, values, out_features, path, observers):
        ctx.save_for_backward(x, rows, cols, values)
        ctx.path, ctx.out_features, ctx.observers = path, out_features, observers
        v = values.to(x.dtype)
        if path == "dense":
            return x @ _dense_s(rows, cols, v, out_features, x.shape[1]).T
        y = x.new_zeros(x.shape[0], out_features)
        step = max(1, CHUNK_ELEMENTS // max(1, rows.numel()))
        for t0 in range(0, x.shape[0], step):
            y[t0 : t0 + step].index_add_(1, rows, x[t0 : t0 + step, cols] * v)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rows, cols, values = ctx.saved_tensors
        dy = dy.contiguous()
        v = values.to(x.dtype)
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dx = dv = dense_grad = None
        if ctx.path == "dense":
            if need_x:
                dx = dy @ _dense_s(rows, cols, v, ctx.out_features, x.shape[1])
            if need_v or ctx.observers:
                dense_grad = dy.T @ x  # (out, in): the dense gradient of W, which the observers reuse
                dv = dense_grad[rows, cols].to(values.dtype) if need_v else None
        else:
            acc_dtype = torch.promote_types(x.dtype, torch.float32)  # sum bf16 products in fp32
            dx = torch.zeros_like(x) if need_x else None
            dv = torch.zeros(values.shape, dtype=acc_dtype, device=x.device) if need_v else None
            step = max(1, CHUNK_ELEMENTS // max(1, rows.numel()))
            for t0 in range(0, x.shape[0], step):
                dy_at = dy[t0 : t0 + step, rows]  # (Tc, k)
                if need_v:
                    dv += (x[t0 : t0 + step, cols] * dy_at).sum(0, dtype=acc_dtype)
                if need_x:
                    dx[t0 : t0 + step].index_add_(1, cols, dy_at * v)
            dv = dv.to(values.dtype) if need_v else None
        for obs in ctx.observers:
            obs.observe(x, dy, dense_grad)
        return dx, None, None, dv, None, None, None


def sparse_delta_linear(
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    out_features: int,
    path: str = "auto",
    observers: tuple = (),
) -> torch.Tensor:
    """y = x S^T, S the (out, in) matrix with S[rows[i], cols[i]] = values[i] (rows, cols (k,) int64, pairs
    unique), without building S on the gather path. x: (..., in) -> (..., out) in the compute dtype: the
    autocast dtype under autocast, else the promotion of x's and values' dtypes (fp32 for bf16 x and fp32
    values, as LoRALinear). values' gradient comes back in values' dtype (fp32 master values).
    path: "auto" (`pick_path`), "gather" or "dense"; both give the same results. observers: objects with
    observe(x (T, in), dy (T, out), dense_grad (out, in) | None), called in backward (GradAccumulator, SM3Stats)."""
    if path not in ("auto", "gather", "dense"):
        raise ValueError(f"path must be auto, gather or dense, got {path!r}")
    if rows.shape != cols.shape or rows.shape != values.shape or values.dim() != 1:
        raise ValueError(
            f"rows {tuple(rows.shape)}, cols {tuple(cols.shape)} and values {tuple(values.shape)} "
            "must be the same 1-D shape"
        )
    dev = x.device.type
    dtype = (
        torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(x.dtype, values.dtype)
    )
    lead, in_features = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_features).to(dtype)
    if path == "auto":
        path = pick_path(x2.shape[0], values.numel(), out_features, in_features)
    with torch.autocast(dev, enabled=False):  # everything is in `dtype` already
        y = _SparseDelta.apply(x2, rows, cols, values, out_features, path, tuple(observers))
    return y.reshape(*lead, out_features)
