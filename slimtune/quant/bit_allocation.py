"""LQ-LoRA bit allocation: one quantization config per matrix under an average bits/param budget.

Matrix i (numel n_i) takes exactly one candidate c with error e[i, c] and storage b[i, c] bits/param:

    minimise  sum_i e[i, c_i]   subject to   sum_i n_i * b[i, c_i] <= budget_bits * sum_i n_i

This is a multiple-choice knapsack, solved exactly as a 0/1 integer linear program with
scipy.optimize.milp (HiGHS): binaries x[i, c], one equality sum_c x[i, c] = 1 per matrix and one
budget row. An error of inf/nan marks a candidate as unavailable (upper bound 0), e.g. a block size
that does not divide the matrix. A greedy solution (cheapest everywhere, then the best
error-per-bit upgrades) is always computed: it scales the objective, and it is the answer when the
solver finds nothing in time (then `optimal` is False).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, eye_array, kron, vstack

# A choice meets the budget when its average is at most budget + _BUDGET_TOL * max(1, budget):
# the average is a float sum, and budget == the minimum achievable must stay feasible.
_BUDGET_TOL = 1e-9
# The scaled objective of the greedy solution; the optimum lies in [0, _OBJECTIVE_SCALE].
_OBJECTIVE_SCALE = 1e4
# brute_force_allocation enumerates C**M choices; refuse beyond 2**_MAX_BRUTE_LOG2 of them.
_MAX_BRUTE_LOG2 = 20


@dataclass
class Allocation:
    """Chosen config per matrix. choice[i] is a column of the (M, C) inputs; errors/bits/numel hold the
    chosen error, bits/param and size of each matrix; avg_bits is the numel-weighted achieved average."""

    choice: list[int]
    total_error: float
    avg_bits: float
    budget_bits: float
    optimal: bool
    names: list[str]
    config_names: list[str]
    errors: list[float]
    bits: list[float]
    numel: list[int]

    @property
    def configs(self) -> list[str]:
        """Chosen config name per matrix."""
        return [self.config_names[c] for c in self.choice]

    def table(self) -> str:
        """Aligned text table: one line per matrix, then a total line (achieved vs budget)."""
        head = ("matrix", "config", "bits/param", "error")
        rows = [
            (n, cfg, f"{b:.4f}", f"{e:.6g}") for n, cfg, b, e in zip(self.names, self.configs, self.bits, self.errors)
        ]
        w = [max(len(r[k]) for r in [head, *rows]) for k in range(4)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}" for r in [head, *rows]]
        status = "optimal" if self.optimal else "not proven optimal"
        lines.append(
            f"total: {sum(self.numel):,} params, {self.avg_bits:.4f} bits/param achieved "
            f"(budget {self.budget_bits:.4f}), error {self.total_error:.6g} ({status})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable dict (plain lists, floats, ints, bools, strings)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Allocation:
        return cls(**d)


def _as_array(x, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def _check_inputs(errors, bits, numel) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> errors (M, C) with unavailable = inf, bits (M, C) with unavailable = 0, weights n_i / N (M,),
    available (M, C) bool."""
    e, b, n = _as_array(errors, "errors", 2), _as_array(bits, "bits", 2), _as_array(numel, "numel", 1)
    if e.shape != b.shape or e.shape[0] != n.shape[0] or e.size == 0:
        raise ValueError(
            f"errors {e.shape} and bits {b.shape} must be the same non-empty (M, C) shape and "
            f"numel {n.shape} must be (M,)"
        )
    if not (np.all(np.isfinite(n)) and np.all(n > 0)):
        raise ValueError("numel must be positive and finite")
    available = np.isfinite(e)
    if np.any(e[available] < 0):
        raise ValueError("errors must be >= 0 (inf or nan marks an unavailable candidate)")
    if not np.all(np.isfinite(b[available]) & (b[available] >= 0)):
        raise ValueError("bits must be finite and >= 0 for every available candidate")
    e = np.where(available, e, np.inf)
    b = np.where(available, b, 0.0)
    return e, b, n / n.sum(), available


def _avg_bits(b: np.ndarray, w: np.ndarray, choice) -> float:
    return float(np.dot(w, b[np.arange(len(w)), choice]))


def _budget_limit(budget: float) -> float:
    return budget + _BUDGET_TOL * max(1.0, abs(budget))


def _within_budget(avg: float, budget: float) -> bool:
    return avg <= _budget_limit(budget)


def _check_feasible(e, b, w, available, budget_bits: float, names) -> float:
    """Raise ValueError when no choice meets the budget; -> the minimum achievable average bits/param."""
    empty = np.flatnonzero(~available.any(axis=1))
    if len(empty):
        raise ValueError(f"matrix {names[empty[0]]!r} has no available candidate (every error is inf/nan)")
    cheapest = np.where(available, b, np.inf).min(axis=1)
    min_avg = float(np.dot(w, cheapest))
    if not math.isfinite(budget_bits):
        raise ValueError(f"budget_bits must be finite, got {budget_bits}")
    if not _within_budget(min_avg, budget_bits):
        raise ValueError(
            f"budget {budget_bits:.10g} bits/param is below the smallest achievable "
            f"{min_avg:.10g} bits/param (every matrix at its cheapest candidate)"
        )
    return min_avg


def _greedy(e, b, w, budget_bits: float) -> np.ndarray:
    """Feasible start: each matrix at its cheapest candidate (lowest error among ties), then repeatedly
    take the upgrade with the largest error drop per extra bit that still fits. -> choice (M,) int."""
    rows = np.arange(len(w))
    choice = np.lexsort((e, np.where(np.isfinite(e), b, np.inf)), axis=-1)[:, 0]
    used, limit = _avg_bits(b, w, choice), _budget_limit(budget_bits)
    while True:
        d_err = e[rows, choice][:, None] - e  # > 0 where c improves on the current pick
        d_bits = w[:, None] * (b - b[rows, choice][:, None])
        ok = (d_err > 0) & np.isfinite(e) & (used + d_bits <= limit)
        if not ok.any():
            return choice
        # error drop per extra bit; an upgrade that costs no extra bits goes first
        gain = np.full(e.shape, -np.inf)
        gain[ok] = np.where(d_bits[ok] > 0, d_err[ok] / np.maximum(d_bits[ok], 1e-300), np.inf)
        i, c = np.unravel_index(int(np.argmax(gain)), gain.shape)
        used += float(d_bits[i, c])
        choice[i] = c


@contextlib.contextmanager
def _quiet_c_stdout():
    """HiGHS 1.12 printf()s a stray debug line on some solves (HiGHS issue #2783): send file
    descriptor 1 to /dev/null for the solve, flushing C's stdio buffer before it comes back."""
    try:
        fd = sys.stdout.fileno()
        libc = ctypes.CDLL(None)
    except (AttributeError, OSError, ValueError):  # no real stdout (e.g. captured): nothing to hide
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                libc.fflush(None)
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def _solve_milp(cost: np.ndarray, b, w, available, rhs: float, time_limit_s: float):
    """One milp call on the scaled objective. -> (choice (M,) or None, proven optimal)."""
    m, c = cost.shape
    one_per_row = kron(eye_array(m), csr_array(np.ones((1, c))))
    budget_row = csr_array((w[:, None] * b).reshape(1, -1))
    a = vstack([one_per_row, budget_row]).tocsr()
    lower = np.concatenate([np.ones(m), [-np.inf]])
    upper = np.concatenate([np.ones(m), [rhs]])
    # mip_rel_gap=0: HiGHS's default 1e-4 relative gap would stop short of the true optimum
    with _quiet_c_stdout():
        res = milp(
            np.where(available, cost, 0.0).ravel(),
            integrality=np.ones(m * c),
            bounds=Bounds(0.0, available.ravel().astype(np.float64)),
            constraints=LinearConstraint(a, lower, upper),
            options={"time_limit": time_limit_s, "mip_rel_gap": 0.0},
        )
    if res.x is None:  # infeasible (ruled out beforehand) or time limit before any integer solution
        return None, False
    return res.x.reshape(m, c).argmax(axis=1), bool(res.success)


def allocate_bits(
    errors, bits, numel, budget_bits: float, names=None, config_names=None, time_limit_s: float = 60.0
) -> Allocation:
    """Pick one config per matrix minimising total error under an average bits/param budget.

    errors, bits: (M, C) array-like (numpy or torch); an inf/nan error marks the candidate unavailable
    (its bits are then ignored). numel: (M,) parameters per matrix. budget_bits: average bits/param
    allowed, weighted by numel. Raises ValueError, naming the minimum achievable average, when the
    budget is infeasible. If HiGHS stops at time_limit_s, its best solution (or the greedy one, whichever
    is better) is returned with optimal=False.
    """
    budget_bits = float(budget_bits)
    e, b, w, available = _check_inputs(errors, bits, numel)
    m, c = e.shape
    names = [f"matrix{i}" for i in range(m)] if names is None else [str(n) for n in names]
    config_names = [f"config{k}" for k in range(c)] if config_names is None else [str(n) for n in config_names]
    if len(names) != m or len(config_names) != c:
        raise ValueError(f"got {len(names)} names and {len(config_names)} config_names for errors of shape {e.shape}")
    min_avg = _check_feasible(e, b, w, available, budget_bits, names)
    rows = np.arange(m)

    greedy = _greedy(e, b, w, budget_bits)
    # Shift each row by its minimum (every choice pays sum_i min_c e[i, c] regardless) and scale so the
    # greedy's remaining error is _OBJECTIVE_SCALE: the optimum then lies in [0, _OBJECTIVE_SCALE], so
    # HiGHS's absolute gap (1e-6) is ~1e-10 of the error the allocation controls, whatever the
    # magnitude of the errors. A candidate alone worse than the whole greedy remainder can never beat
    # the greedy, so it is dropped: the coefficients stay in [0, _OBJECTIVE_SCALE].
    shifted = np.where(available, e - np.where(available, e, np.inf).min(axis=1, keepdims=True), 0.0)
    scale = float(shifted[rows, greedy].sum())
    useful = available & (shifted <= scale)
    best, optimal = greedy, scale == 0.0  # greedy already at every row's minimum error: optimal
    if not optimal:
        rhs, deadline = max(budget_bits, min_avg), time.monotonic() + time_limit_s
        # HiGHS may overshoot the budget within its feasibility tolerance (~1e-7 on the average); then
        # tighten the right-hand side and re-solve (optimal for a tighter budget is not proven optimal).
        for attempt in range(4):
            left_s = max(deadline - time.monotonic(), 1e-3)
            choice, optimal = _solve_milp(shifted * (_OBJECTIVE_SCALE / scale), b, w, useful, rhs, left_s)
            optimal = optimal and attempt == 0
            if choice is None:
                break
            avg = _avg_bits(b, w, choice)
            if _within_budget(avg, budget_bits):
                if e[rows, choice].sum() <= e[rows, greedy].sum():
                    best = choice
                break
            rhs = max(min_avg, rhs - 2 * (avg - budget_bits))
    best = [int(k) for k in best]
    return Allocation(
        choice=best,
        total_error=float(e[rows, best].sum()),
        avg_bits=_avg_bits(b, w, best),
        budget_bits=budget_bits,
        optimal=optimal,
        names=names,
        config_names=config_names,
        errors=[float(x) for x in e[rows, best]],
        bits=[float(x) for x in b[rows, best]],
        numel=[int(x) for x in _as_array(numel, "numel", 1)],
    )


def brute_force_allocation(errors, bits, numel, budget_bits: float) -> list[int]:
    """Exhaustive optimum over all C**M choices (tests, tiny instances). Ties go to the first choice in
    lexicographic order. Raises ValueError when C**M > 2**20 or the budget is infeasible."""
    e, b, w, available = _check_inputs(errors, bits, numel)
    m, c = e.shape
    if m * math.log2(max(c, 1)) > _MAX_BRUTE_LOG2:
        raise ValueError(
            f"brute force over {c}**{m} choices is too large (limit 2**{_MAX_BRUTE_LOG2}); use allocate_bits"
        )
    _check_feasible(e, b, w, available, float(budget_bits), [f"matrix{i}" for i in range(m)])
    # all choices at once, row 0 varying slowest: (C**M,) total error and average bits
    tot_err, tot_bits = np.zeros(1), np.zeros(1)
    for i in range(m):
        tot_err = (tot_err[:, None] + e[i][None, :]).ravel()
        tot_bits = (tot_bits[:, None] + w[i] * b[i][None, :]).ravel()
    tot_err[tot_bits > _budget_limit(float(budget_bits))] = np.inf
    flat = int(np.argmin(tot_err))  # feasibility was checked, so this is finite
    return [int(k) for k in np.unravel_index(flat, (c,) * m)]
