"""SpIEL's regrowth: the growth statistics observed in backward, the schedule, and the optimizer-state move.

- "ag" (`GradAccumulator`): the dense gradient g = dy^T x of W summed over the backward passes of the
  accumulation window; score |sum|. Memory: one (out, in) fp32 buffer per module, only while the window is open.
- "ma" (`SM3Stats`): row and column sums of g^2, computed exactly without the (out, in) gradient; score
  row_i * col_j (SpIEL's reference code's outer product). Memory: out + in fp32 per module, persistent.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# Upper bound on the elements of one (tokens x k) temporary of the gather path, one (rows x in) score block
# and one statistics block: 2^24 fp32 values are 64 MiB, whatever the token count or matrix size.
CHUNK_ELEMENTS = 2**24
EIGHT_BIT_SUFFIXES = ("_q_int8", "_q_uint8", "_absmax")  # states8bit's keys (never used for 1-D params)

ScoreBlocks = Callable[[int, int], torch.Tensor]  # (row_start, row_end) -> (row_end - row_start, in) scores


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
            xb, db = xf[t0 : t0 + step], df[t0 : t0 + step]
            row += (db * ((xb @ xf.T) @ df)).sum(0)  # rows t0.. of (X X^T) DY, times DY, summed over tokens
            col += (xb * ((db @ df.T) @ xf)).sum(0)
    elif method == "blocked":
        step = max(1, CHUNK_ELEMENTS // in_features)
        for r0 in range(0, out_features, step):
            g2 = (dy[:, r0 : r0 + step].T @ x).float().square_()
            row[r0 : r0 + step] = g2.sum(1)
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
                g2 = dense_grad[r0 : r0 + step].float().square()
                row[r0 : r0 + step], col = g2.sum(1), col + g2.sum(0)
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


def _top_candidates(
    scores: torch.Tensor | ScoreBlocks, n: int, excluded: torch.Tensor, out_features: int, in_features: int
) -> torch.Tensor:
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
        lo, hi = torch.searchsorted(
            excluded, torch.tensor([r0 * in_features, r1 * in_features], device=excluded.device)
        ).tolist()
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


def remap_adam_state(state: dict, old_to_new: torch.Tensor, new_len: int, grown: str = "zero") -> dict:
    """Move an AdamW per-parameter state (slimtune's or torch's: step, exp_avg, exp_avg_sq[, max_exp_avg_sq])
    of `deltas` through a reselection, in place: entry i of every (old_len,) tensor goes to position
    old_to_new[i] (dropped entries: -1), `step` and other keys are kept. Grown entries start at 0
    (grown="zero"), or (grown="mean") with the kept entries' mean second moment: Adam's bias correction
    treats every entry as old as the run, so from zero moments a new entry's first updates come out up to
    ~6x a normal step ((1 - b1^k) / sqrt(1 - b2^k)); a seeded second moment makes them start small instead.
    Tensors keep their identity when new_len == old_len. Returns `state`."""
    old_len = old_to_new.numel()
    kept = old_to_new >= 0
    for key, value in list(state.items()):
        if key.endswith(EIGHT_BIT_SUFFIXES):
            raise ValueError(f"optimizer state key {key!r} is 8-bit; the 1-D deltas always keep fp32 moments")
        if key == "step" or not torch.is_tensor(value) or value.shape != (old_len,):
            continue
        fill = 0.0
        if grown == "mean" and key in ("exp_avg_sq", "max_exp_avg_sq") and bool(kept.any()):
            fill = value[kept.to(value.device)].mean().item()
        moved = torch.full((new_len,), fill, dtype=value.dtype, device=value.device)
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


class RegrowSchedule:
    """The trainer hooks of adapter.type=sparse_ft (slimtune.hooks.Hooks' methods): the statistics switched
    on for the `accumulate_steps` steps before each reselection, and after optimizer step s (1-based) a
    reselection of drop_fraction_at(s) of every module's entries, statistics summed over ranks first (every
    rank then picks the same entries), the optimizer's moments moved with their entries (grown ones at 0).
    cfg: SparseFTConfig."""

    def __init__(self, cfg, max_steps: int, modules: list):
        self.cfg, self.max_steps, self.modules = cfg, max_steps, modules  # the SparseFTLinear modules

    def _stats(self, m):
        return m.sm3 if self.cfg.regrow == "ma" else m.grad_acc

    def _open_window(self, next_step: int) -> None:
        c = self.cfg
        if c.drop_fraction > 0 and in_accumulation_window(next_step, c.reselect_every, c.accumulate_steps):
            for m in self.modules:
                self._stats(m).start()

    def on_setup(self, model, optimizer, cfg) -> None:
        self._open_window(1)

    def on_load(self, path, step: int) -> None:
        self._open_window(step + 1)  # statistics saved mid-window came back with the adapters' state

    def after_backward(self, model, step: int) -> None:
        pass

    def before_step(self, optimizer, step: int) -> None:
        pass

    def on_save(self, path, step: int) -> None:
        pass

    @torch.no_grad()
    def after_step(self, model, optimizer, step: int) -> None:
        c = self.cfg
        fraction = drop_fraction_at(step, c.reselect_every, c.drop_fraction, self.max_steps)
        if fraction > 0:
            for m in self.modules:
                all_reduce_stats(m.regrow_stats())
                old_to_new, _ = m.regrow(fraction, c.regrow)
                state = optimizer.state.get(m.deltas)
                if state:
                    remap_adam_state(state, old_to_new, m.num_params, c.grown_moments)
        if step % c.reselect_every == 0:  # the window is over, used or not
            for m in self.modules:
                self._stats(m).reset()
        self._open_window(step + 1)
