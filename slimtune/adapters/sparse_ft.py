"""Sparse fine-tuning, SpIEL (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models").

Each wrapped matrix keeps k = round(density * out * in) active entries: `indices` (k,) int64 flat
positions r * in + c, sorted and unique, and `deltas` (k,) fp32 master values, so W' = W + scatter(deltas).
The active set starts uniformly at random (seeded per module) and is changed every few steps by
`reselect`: the entries with the smallest |delta| are dropped and as many are grown where a growth score
is largest. Two scores, both observed inside the backward of `sparse_delta_linear` from the layer's
input x (T, in) and output gradient dy (T, out), i.e. of the dense gradient g = dy^T x of W:

- "ag" (`GradAccumulator`): the dense gradient summed over the backward passes of the accumulation
  window; score |sum|. Memory: one (out, in) fp32 buffer per module, only while the window is open.
- "ma" (`SM3Stats`): row and column sums of g^2, computed exactly without the (out, in) gradient; score
  row_i * col_j (SpIEL's reference code's outer product). Memory: out + in fp32 per module, persistent.

Per step the integrator: `in_accumulation_window` -> `start()` the statistics; after the optimizer step,
`drop_fraction_at` -> `regrow` -> `remap_adam_state` on the optimizer's state of `deltas`.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import torch
import torch.nn as nn

from slimtune.quant import is_quantized_linear
from slimtune.registry import ADAPTERS

# Upper bound on the elements of one (tokens x k) temporary of the gather path, one (rows x in) score block
# and one statistics block: 2^24 fp32 values are 64 MiB, whatever the token count or matrix size.
CHUNK_ELEMENTS = 2**24
EIGHT_BIT_SUFFIXES = ("_q_int8", "_q_uint8", "_absmax")  # states8bit's keys (never used for 1-D params)

ScoreBlocks = Callable[[int, int], torch.Tensor]  # (row_start, row_end) -> (row_end - row_start, in) scores


def pick_path(tokens: int, k: int, out_features: int, in_features: int) -> str:
    """"gather" while its (tokens x k) work is under one dense (out, in) matrix, else "dense"."""
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
            y[t0:t0 + step].index_add_(1, rows, x[t0:t0 + step, cols] * v)
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
                dy_at = dy[t0:t0 + step, rows]  # (Tc, k)
                if need_v:
                    dv += (x[t0:t0 + step, cols] * dy_at).sum(0, dtype=acc_dtype)
                if need_x:
                    dx[t0:t0 + step].index_add_(1, cols, dy_at * v)
            dv = dv.to(values.dtype) if need_v else None
        for obs in ctx.observers:
            obs.observe(x, dy, dense_grad)
        return dx, None, None, dv, None, None, None


def sparse_delta_linear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                        out_features: int, path: str = "auto", observers: tuple = ()) -> torch.Tensor:
    """y = x S^T, S the (out, in) matrix with S[rows[i], cols[i]] = values[i] (rows, cols (k,) int64, pairs
    unique), without building S on the gather path. x: (..., in) -> (..., out) in the compute dtype: the
    autocast dtype under autocast, else the promotion of x's and values' dtypes (fp32 for bf16 x and fp32
    values, as LoRALinear). values' gradient comes back in values' dtype (fp32 master values).
    path: "auto" (`pick_path`), "gather" or "dense"; both give the same results. observers: objects with
    observe(x (T, in), dy (T, out), dense_grad (out, in) | None), called in backward (GradAccumulator, SM3Stats)."""
    if path not in ("auto", "gather", "dense"):
        raise ValueError(f"path must be auto, gather or dense, got {path!r}")
    if rows.shape != cols.shape or rows.shape != values.shape or values.dim() != 1:
        raise ValueError(f"rows {tuple(rows.shape)}, cols {tuple(cols.shape)} and values {tuple(values.shape)} "
                         "must be the same 1-D shape")
    dev = x.device.type
    dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
             else torch.promote_types(x.dtype, values.dtype))
    lead, in_features = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_features).to(dtype)
    if path == "auto":
        path = pick_path(x2.shape[0], values.numel(), out_features, in_features)
    with torch.autocast(dev, enabled=False):  # everything is in `dtype` already
        y = _SparseDelta.apply(x2, rows, cols, values, out_features, path, tuple(observers))
    return y.reshape(*lead, out_features)


class GradAccumulator:
    """SpIEL-AG's statistic: `grad` (out, in) fp32 = sum of the dense gradients dy^T x of every backward pass
    while active (micro-batches included); growth score |grad|. The buffer exists only between start() and
    reset(): one (out, in) fp32 per module during the accumulation window, none outside it."""

    def __init__(self, out_features: int, in_features: int):
        self.out_features, self.in_features = out_features, in_features
        self.active, self.grad = False, None

    def start(self) -> None:
        self.active = True  # the buffer is allocated at the first backward, on the activations' device

    def reset(self) -> None:
        self.active, self.grad = False, None

    @torch.no_grad()
    def observe(self, x: torch.Tensor, dy: torch.Tensor, dense_grad: torch.Tensor | None) -> None:
        if self.grad is None:
            self.grad = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=x.device)
        if dense_grad is not None:
            self.grad.add_(dense_grad)
        elif x.dtype == torch.float32:
            self.grad.addmm_(dy.T, x)
        else:  # bf16: the matmul accumulates in fp32 inside; its (out, in) result is transient
            self.grad.add_(dy.T @ x)

    def score_blocks(self) -> ScoreBlocks:
        if self.grad is None:
            raise RuntimeError("GradAccumulator has no statistics: start() it and run a backward first")
        return lambda r0, r1: self.grad[r0:r1].abs()


def grad_square_sums(x: torch.Tensor, dy: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (sum_j g_ij^2 (out,), sum_i g_ij^2 (in,)) fp32 of g = dy^T x without the (out, in) matrix g.
    x: (T, in), dy: (T, out). "gram": sum_j g_ij^2 = diag(DY^T (X X^T) DY)_i and sum_i g_ij^2 =
    diag(X^T (DY DY^T) X)_j, over blocks of token rows of the Gram matrices, 2 T^2 (in + out) flops, on
    fp32 copies of x and dy (the Gram products cancel); "blocked": g a block of rows at a time in x's dtype
    (bf16: fp32 accumulation inside the matmul, g rounded to bf16 before squaring), 2 T in out flops.
    "auto" takes the cheaper one. Temporaries are capped near CHUNK_ELEMENTS values (plus gram's copies)."""
    tokens, in_features, out_features = x.shape[0], x.shape[1], dy.shape[1]
    if method == "auto":
        method = "gram" if tokens * (in_features + out_features) < in_features * out_features else "blocked"
    row = torch.zeros(out_features, dtype=torch.float32, device=x.device)
    col = torch.zeros(in_features, dtype=torch.float32, device=x.device)
    if method == "gram":
        xf, df = x.float(), dy.float()
        step = max(1, CHUNK_ELEMENTS // max(tokens, in_features, out_features))
        for t0 in range(0, tokens, step):
            xb, db = xf[t0:t0 + step], df[t0:t0 + step]
            row += (db * ((xb @ xf.T) @ df)).sum(0)  # rows t0.. of (X X^T) DY, times DY, summed over tokens
            col += (xb * ((db @ df.T) @ xf)).sum(0)
    elif method == "blocked":
        step = max(1, CHUNK_ELEMENTS // in_features)
        for r0 in range(0, out_features, step):
            g2 = (dy[:, r0:r0 + step].T @ x).float().square_()
            row[r0:r0 + step] = g2.sum(1)
            col += g2.sum(0)
    else:
        raise ValueError(f"method must be auto, gram or blocked, got {method!r}")
    return row, col


class SM3Stats:
    """SpIEL-MA's statistic, SM3's row and column covers fed with exact sums. Stored (fp32, out + in values):

        row_i <- decay * row_i + sum_j g_ij^2      col_j <- decay * col_j + sum_i g_ij^2

    for every backward pass while active, g = dy^T x that pass's dense gradient of W (SM3 keeps per-cover
    maxima of entries; the sums here are exact without g). Both bound acc_ij = sum over passes of g_ij^2
    from above. Growth score ("product", default) row_i * col_j / sum(row): Adafactor's rank-1 estimate of
    acc_ij, ranked like SpIEL's reference code's outer(row, col); "min": min(row_i, col_j), SM3's estimate,
    which ties along whole rows and columns. decay=1 sums since start()/reset()."""

    def __init__(self, out_features: int, in_features: int, decay: float = 1.0, score: str = "product"):
        if score not in ("product", "min"):
            raise ValueError(f"SM3 score must be product or min, got {score!r}")
        self.out_features, self.in_features, self.decay, self.score = out_features, in_features, decay, score
        self.active, self.row, self.col = False, None, None

    def start(self) -> None:
        self.active = True

    def reset(self) -> None:
        self.active, self.row, self.col = False, None, None

    @torch.no_grad()
    def observe(self, x: torch.Tensor, dy: torch.Tensor, dense_grad: torch.Tensor | None) -> None:
        if self.row is None:
            self.row = torch.zeros(self.out_features, dtype=torch.float32, device=x.device)
            self.col = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
        if dense_grad is not None:  # the dense path has g already: square it a block of rows at a time
            row, col = torch.zeros_like(self.row), torch.zeros_like(self.col)
            step = max(1, CHUNK_ELEMENTS // self.in_features)
            for r0 in range(0, self.out_features, step):
                g2 = dense_grad[r0:r0 + step].float().square()
                row[r0:r0 + step], col = g2.sum(1), col + g2.sum(0)
        else:
            row, col = grad_square_sums(x, dy)
        self.row.mul_(self.decay).add_(row)
        self.col.mul_(self.decay).add_(col)

    def score_blocks(self) -> ScoreBlocks:
        if self.row is None:
            raise RuntimeError("SM3Stats has no statistics: start() it and run a backward first")
        if self.score == "min":
            return lambda r0, r1: torch.minimum(self.row[r0:r1, None], self.col[None, :])
        total = self.row.sum().clamp_min(torch.finfo(torch.float32).tiny)
        return lambda r0, r1: torch.outer(self.row[r0:r1], self.col) / total


def module_seed(seed: int, name: str) -> int:
    """A per-module seed from the run's seed and the module's qualified name (the same on every rank)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _sample_unique(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct values of range(n), uniform without replacement, sorted (CPU int64); O(k) memory when
    k << n instead of randperm(n)'s n int64."""
    if 8 * k >= n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    drawn = torch.empty(0, dtype=torch.int64)
    while drawn.numel() < k:  # the distinct values of i.i.d. draws are a uniform subset given their count
        more = torch.randint(0, n, (k - drawn.numel() + k // 8 + 16,), generator=generator)
        drawn = torch.unique(torch.cat([drawn, more]))
    return drawn[torch.randperm(drawn.numel(), generator=generator)[:k]].sort().values


def _top_candidates(scores: torch.Tensor | ScoreBlocks, n: int, excluded: torch.Tensor,
                    out_features: int, in_features: int) -> torch.Tensor:
    """Flat indices (n,) of the n highest scores outside `excluded` (sorted flat indices), scoring one block
    of rows at a time (at most ~CHUNK_ELEMENTS scores alive). NaN and -inf scores rank last; ties are
    broken by torch.topk (deterministic for the same input on the same device)."""
    if torch.is_tensor(scores):
        if tuple(scores.shape) != (out_features, in_features):
            raise ValueError(f"scores {tuple(scores.shape)} do not match ({out_features}, {in_features})")
        dense = scores
        scores = lambda r0, r1: dense[r0:r1]  # noqa: E731
    step = max(1, CHUNK_ELEMENTS // in_features)
    best_s = torch.empty(0, device=excluded.device)
    best_i = torch.empty(0, dtype=torch.int64, device=excluded.device)
    lowest = torch.finfo(torch.float32).min
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        s = scores(r0, r1).to(device=excluded.device, dtype=torch.float32).reshape(-1)
        s = torch.where(torch.isnan(s) | (s == -math.inf), lowest, s)  # a fresh tensor: the caller's is untouched
        lo, hi = torch.searchsorted(excluded, torch.tensor([r0 * in_features, r1 * in_features],
                                                           device=excluded.device)).tolist()
        s[excluded[lo:hi] - r0 * in_features] = -math.inf  # active or just dropped: never regrown
        top_s, top_i = s.topk(min(n, s.numel()))
        best_s, best_i = torch.cat([best_s, top_s]), torch.cat([best_i, top_i + r0 * in_features])
        if best_s.numel() > n:
            best_s, keep = best_s.topk(n)
            best_i = best_i[keep]
    return best_i


def drop_fraction_at(step: int, reselect_every: int, initial_fraction: float, max_steps: int) -> float:
    """Fraction of the active entries to change after optimizer step `step` (1-based): RigL's cosine decay
    f(t) = initial_fraction / 2 * (1 + cos(pi * t / max_steps)) at the reselection steps (t a positive
    multiple of reselect_every below max_steps), 0.0 at every other step."""
    if step <= 0 or step % reselect_every != 0 or step >= max_steps:
        return 0.0
    return initial_fraction / 2 * (1 + math.cos(math.pi * step / max_steps))


def in_accumulation_window(step: int, reselect_every: int, accumulate_steps: int) -> bool:
    """True when optimizer step `step` (1-based) is one of the `accumulate_steps` steps whose backward passes
    feed the statistics of the reselection after step m * reselect_every."""
    return (step - 1) % reselect_every >= reselect_every - accumulate_steps


def remap_adam_state(state: dict, old_to_new: torch.Tensor, new_len: int) -> dict:
    """Move an AdamW per-parameter state (slimtune's or torch's: step, exp_avg, exp_avg_sq[, max_exp_avg_sq])
    of `deltas` through a reselection, in place: entry i of every (old_len,) tensor goes to position
    old_to_new[i] (dropped entries: -1), grown entries start at 0, `step` and other keys are kept.
    Tensors keep their identity when new_len == old_len. Returns `state`."""
    old_len = old_to_new.numel()
    kept = old_to_new >= 0
    for key, value in list(state.items()):
        if key.endswith(EIGHT_BIT_SUFFIXES):
            raise ValueError(f"optimizer state key {key!r} is 8-bit; the 1-D deltas always keep fp32 moments")
        if key == "step" or not torch.is_tensor(value) or value.shape != (old_len,):
            continue
        moved = torch.zeros(new_len, dtype=value.dtype, device=value.device)
        moved[old_to_new[kept].to(value.device)] = value[kept.to(value.device)]
        if new_len == old_len:
            value.copy_(moved)
        else:
            state[key] = moved
    return state


def all_reduce_stats(tensors: list[torch.Tensor]) -> None:
    """Sum the regrowth statistics over ranks (no-op in one process): every rank then grows the same entries.
    The statistics are linear in what each rank observed, so one reduction before reselection suffices."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


@ADAPTERS.register("sparse_ft")
class SparseFTLinear(nn.Module):
    """y = base(x) + x S^T with S (out, in) holding `deltas` at `indices`. `base` is any linear-like module
    (nn.Linear, slimtune quantized, bitsandbytes), frozen and never copied. Give exactly one of density
    (k = max(1, round(density * out * in))) or num_params (k). seed: the initial random draw's (use
    `module_seed(run_seed, name)` so that equal-shaped modules differ). Deltas start at 0, so at init the
    output equals the base's. `grad_acc` ("ag") and `sm3` ("ma") are the regrowth statistics, off until
    start()ed; `path`: "auto" | "gather" | "dense" for `sparse_delta_linear`."""

    def __init__(self, base: nn.Module, density: float | None = None, num_params: int | None = None, seed: int = 0):
        super().__init__()
        in_f, out_f = base.in_features, base.out_features
        if (density is None) == (num_params is None):
            raise ValueError(f"give exactly one of density ({density}) and num_params ({num_params})")
        if density is not None and not 0.0 < density <= 1.0:
            raise ValueError(f"sparse_ft density must be in (0, 1], got {density}")
        k = max(1, round(density * out_f * in_f)) if num_params is None else num_params
        if not 0 < k <= out_f * in_f:
            raise ValueError(f"sparse_ft num_params={k} must be in [1, {out_f * in_f}] for a ({out_f}, {in_f}) weight")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features, self.seed = in_f, out_f, seed
        device = _base_device(base)
        generator = torch.Generator().manual_seed(seed)  # CPU draw: the same indices on every device and rank
        self.register_buffer("indices", _sample_unique(out_f * in_f, k, generator).to(device))
        self.deltas = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))  # fp32 master values
        self.grad_acc = GradAccumulator(out_f, in_f)
        self.sm3 = SM3Stats(out_f, in_f)
        self.path = "auto"
        self.merged = False

    @classmethod
    def from_config(cls, base: nn.Module, cfg, name: str | None = None) -> "SparseFTLinear":
        """cfg: AdapterConfig (density, default 0.01, and seed, default 0, until the keys exist). name: the
        module's qualified name, mixed into the seed (`module_seed`) so that each module draws its own set."""
        seed = getattr(cfg, "seed", 0)
        return cls(base, density=getattr(cfg, "density", 0.01), seed=seed if name is None else module_seed(seed, name))

    @property
    def num_params(self) -> int:
        return self.deltas.numel()

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices // self.in_features, self.indices % self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in the base output's dtype."""
        y = self.base(x)
        if self.merged:
            return y
        observers = tuple(s for s in (self.grad_acc, self.sm3) if s.active) if torch.is_grad_enabled() else ()
        rows, cols = self.rows_cols()
        delta = sparse_delta_linear(x, rows, cols, self.deltas, self.out_features, self.path, observers)
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: the deltas scattered at their indices, zero elsewhere."""
        dense = torch.zeros(self.out_features * self.in_features, dtype=torch.float32, device=self.deltas.device)
        dense[self.indices] = self.deltas.detach().float()
        return dense.view(self.out_features, self.in_features)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.deltas]

    def regrow_state(self) -> dict[str, torch.Tensor]:
        """The allocated statistics by name ("ag_grad", "sm3_row", "sm3_col"), for checkpoints: the module's
        state_dict holds `indices` and `deltas` only."""
        named = {"ag_grad": self.grad_acc.grad, "sm3_row": self.sm3.row, "sm3_col": self.sm3.col}
        return {key: t for key, t in named.items() if t is not None}

    def load_regrow_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of regrow_state(); a statistic present is restored onto the deltas' device and switched on."""
        dev = self.deltas.device
        if "ag_grad" in state:
            self.grad_acc.grad, self.grad_acc.active = state["ag_grad"].to(dev, torch.float32, copy=True), True
        if "sm3_row" in state:
            self.sm3.row = state["sm3_row"].to(dev, torch.float32, copy=True)
            self.sm3.col, self.sm3.active = state["sm3_col"].to(dev, torch.float32, copy=True), True

    def regrow_stats(self) -> list[torch.Tensor]:
        """The live regrowth statistics (for `all_reduce_stats` before reselection): ag's buffer, SM3's row/col."""
        return [t for t in (self.grad_acc.grad, self.sm3.row, self.sm3.col) if t is not None]

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Add the deltas into a plain nn.Linear's weight, touching only the k active entries (their previous
        values are kept, k values, so unmerge() restores the weight bit for bit). A quantized base is refused:
        its quantization step is far coarser than the sparse deltas. safe: raise, unmerged, if non-finite."""
        if self.merged:
            raise RuntimeError("sparse_ft adapter is already merged; unmerge() first")
        base = self.base
        if not isinstance(base, nn.Linear) or is_quantized_linear(base):
            raise NotImplementedError(f"cannot merge sparse_ft into {type(base).__name__} in place; export with "
                                      "`slimtune export RUN_DIR --merge`, which merges into the full-precision base")
        flat = base.weight.view(-1)
        before = flat[self.indices].clone()
        new = before.float() + self.deltas.float()
        if safe and not torch.isfinite(new).all():
            raise ValueError("merging this sparse_ft adapter gives non-finite weights; not merged")
        flat[self.indices] = new.to(flat.dtype)
        self._weights_before_merge = before
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("sparse_ft adapter is not merged")
        self.base.weight.view(-1)[self.indices] = self._weights_before_merge
        del self._weights_before_merge
        self.merged = False

    @torch.no_grad()
    def reselect(self, n_change: int, scores: torch.Tensor | ScoreBlocks) -> tuple[torch.Tensor, torch.Tensor]:
        """SpIEL's drop and grow. Drop the n_change active entries of smallest |delta| (ties: the lower flat
        index first); grow the n_change highest `scores` among entries neither active nor just dropped, with
        delta 0. scores: a dense (out, in) tensor, or f(row_start, row_end) -> (row_end - row_start, in)
        scores of those rows (evaluated a block at a time). n_change is clipped to [0, min(k, out*in - k)].
        `indices` stays sorted, k is unchanged, and `deltas` (same Parameter, rewritten in place; its .grad
        too) keeps the kept entries' values. Returns (old_to_new (k,): each old entry's new position or -1
        if dropped, new_to_old (k,): each new entry's old position or -1 if grown), for `remap_adam_state`."""
        if self.merged:
            raise RuntimeError("unmerge() before reselecting")
        k, dev = self.num_params, self.indices.device
        n = max(0, min(int(n_change), k, self.out_features * self.in_features - k))
        if n == 0:
            same = torch.arange(k, device=dev)
            return same, same.clone()
        drop = torch.sort(self.deltas.detach().abs(), stable=True).indices[:n]  # stable: ties by position = index
        kept = torch.ones(k, dtype=torch.bool, device=dev)
        kept[drop] = False
        grown = _top_candidates(scores, n, self.indices, self.out_features, self.in_features)
        kept_pos = kept.nonzero().squeeze(1)
        new_indices, order = torch.sort(torch.cat([self.indices[kept_pos], grown.to(dev)]))
        new_to_old = torch.cat([kept_pos, torch.full((n,), -1, dtype=torch.int64, device=dev)])[order]
        old_to_new = torch.full((k,), -1, dtype=torch.int64, device=dev)
        old_to_new[new_to_old[new_to_old >= 0]] = (new_to_old >= 0).nonzero().squeeze(1)
        self.indices.copy_(new_indices)
        for t in (self.deltas.data, self.deltas.grad):
            if t is not None:
                moved = torch.where(new_to_old >= 0, t[new_to_old.clamp_min(0)], torch.zeros((), dtype=t.dtype,
                                                                                          device=t.device))
                t.copy_(moved)
        return old_to_new, new_to_old

    def growth_scores(self, criterion: str) -> ScoreBlocks:
        """The score blocks of criterion "ag" (|accumulated gradient|) or "ma" (SM3 estimate)."""
        if criterion == "ag":
            return self.grad_acc.score_blocks()
        if criterion == "ma":
            return self.sm3.score_blocks()
        raise ValueError(f"sparse_ft regrowth criterion must be ag or ma, got {criterion!r}")

    def regrow(self, fraction: float, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
        """reselect(int(fraction * k), growth_scores(criterion)); then frees ag's buffer (its window is over).
        SM3's accumulators are kept (reset them with `sm3.reset()` for windowed statistics)."""
        mapping = self.reselect(int(fraction * self.num_params), self.growth_scores(criterion))
        if criterion == "ag":
            self.grad_acc.reset()
        return mapping

    def extra_repr(self) -> str:
        total = self.out_features * self.in_features
        return f"num_params={self.num_params}, density={self.num_params / total:.4g}, merged={self.merged}"
