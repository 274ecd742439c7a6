"""LQ-LoRA bit allocation: the milp answer against exhaustive search, edge budgets, unavailable candidates."""

import json
import math

import numpy as np
import pytest
import torch

import slimtune.quant.bit_allocation as ba
from slimtune.quant.bit_allocation import (
    Allocation,
    allocate_bits,
    brute_force_allocation,
)


def _instance(seed: int, m: int = 6, c: int = 4, spread: float = 0.0):
    """Random (errors, bits, numel): more bits -> less error per row; spread = log10 range of row scales."""
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.uniform(2.0, 8.0, (m, c)), axis=1)
    errors = np.sort(rng.uniform(0.0, 1.0, (m, c)), axis=1)[:, ::-1] * 10 ** rng.uniform(-spread, spread, (m, 1))
    numel = rng.integers(64, 4096, m)
    return errors.copy(), bits, numel


def _avg(bits, numel, choice) -> float:
    return float(np.dot(numel, bits[np.arange(len(numel)), choice]) / numel.sum())


def _total(errors, choice) -> float:
    return float(errors[np.arange(len(choice)), choice].sum())


def _budget_range(bits, numel) -> tuple[float, float]:
    """(cheapest, most expensive) achievable average bits/param."""
    return _avg(bits, numel, bits.argmin(axis=1)), _avg(bits, numel, bits.argmax(axis=1))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("frac", [0.1, 0.4, 0.75])
def test_matches_brute_force(seed, frac):
    errors, bits, numel = _instance(seed, spread=3.0 if seed % 2 else 0.0)  # odd seeds: errors over 6 decades
    lo, hi = _budget_range(bits, numel)
    budget = lo + frac * (hi - lo)
    alloc = allocate_bits(errors, bits, numel, budget)
    ref = brute_force_allocation(errors, bits, numel, budget)
    assert alloc.optimal and len(alloc.choice) == 6
    assert alloc.avg_bits <= budget + 1e-9 and alloc.avg_bits == pytest.approx(_avg(bits, numel, alloc.choice))
    assert alloc.total_error == pytest.approx(_total(errors, ref), rel=1e-9)
    assert alloc.total_error == pytest.approx(_total(errors, alloc.choice), rel=1e-12)  # true, unscaled errors
    # the budget binds: the unconstrained choice (all most-expensive here) does not fit
    assert _avg(bits, numel, errors.argmin(axis=1)) > budget


def test_unsorted_candidates_and_torch_inputs():
    # errors not monotone in bits (a cheap config may beat a dearer one), inputs as torch tensors
    rng = np.random.default_rng(11)
    errors, bits, numel = rng.uniform(0, 1, (7, 5)), rng.uniform(2, 8, (7, 5)), rng.integers(10, 1000, 7)
    lo, hi = _budget_range(bits, numel)
    budget = (lo + hi) / 2
    alloc = allocate_bits(torch.from_numpy(errors).float(), torch.from_numpy(bits), torch.from_numpy(numel), budget)
    ref = brute_force_allocation(errors.astype(np.float32).astype(np.float64), bits, numel, budget)
    assert alloc.total_error == pytest.approx(_total(errors.astype(np.float32).astype(np.float64), ref), rel=1e-9)
    assert alloc.avg_bits <= budget + 1e-9


def test_huge_budget_picks_row_minimum():
    errors, bits, numel = _instance(3)
    rng = np.random.default_rng(0)
    errors = errors[:, rng.permutation(4)]  # the best candidate is no longer always the last column
    alloc = allocate_bits(errors, bits, numel, 1e6)
    assert alloc.choice == errors.argmin(axis=1).tolist() and alloc.optimal


def test_budget_at_minimum_picks_cheapest():
    errors, bits, numel = _instance(4)
    cheapest = bits.argmin(axis=1)
    budget = _avg(bits, numel, cheapest)
    alloc = allocate_bits(errors, bits, numel, budget)
    assert alloc.choice == cheapest.tolist()
    assert alloc.avg_bits == pytest.approx(budget, rel=1e-12)
    assert brute_force_allocation(errors, bits, numel, budget) == cheapest.tolist()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_unavailable_candidates_never_chosen(bad):
    errors, bits, numel = _instance(5)
    # make the unavailable ones the most tempting: zero-bit (as a caller's placeholder) and no error
    errors[:, 0], bits[:, 0] = bad, 0.0
    errors[2, 3] = bad
    lo, hi = _budget_range(bits[:, 1:], numel)
    for budget in (lo, (lo + hi) / 2, 1e6):
        alloc = allocate_bits(errors, bits, numel, budget)
        assert 0 not in alloc.choice and alloc.choice[2] != 3
        assert all(math.isfinite(e) for e in alloc.errors)
        assert alloc.total_error == pytest.approx(
            _total(errors, brute_force_allocation(errors, bits, numel, budget)), rel=1e-9
        )


def test_infeasible_budget_names_minimum():
    errors = np.array([[1.0, 0.5], [2.0, 1.0]])
    bits = np.array([[2.0, 4.0], [2.5, 4.0]])
    numel = np.array([100, 100])  # cheapest: (2.0 + 2.5) / 2 = 2.25 bits/param
    with pytest.raises(ValueError, match=r"budget 1\.5 bits/param is below the smallest achievable 2\.25"):
        allocate_bits(errors, bits, numel, 1.5)
    with pytest.raises(ValueError, match="2.25"):
        brute_force_allocation(errors, bits, numel, 2.0)
    errors[1] = math.inf
    with pytest.raises(ValueError, match="'b' has no available candidate"):
        allocate_bits(errors, bits, numel, 8.0, names=["a", "b"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same non-empty"):
        allocate_bits(np.ones((3, 2)), np.ones((3, 3)), [1, 1, 1], 4.0)
    with pytest.raises(ValueError, match=">= 0"):
        allocate_bits([[-1.0, 0.5]], [[2.0, 4.0]], [10], 4.0)
    with pytest.raises(ValueError, match="too large"):
        brute_force_allocation(np.ones((30, 4)), np.ones((30, 4)), np.ones(30), 4.0)


def test_solver_without_solution_falls_back_to_greedy(monkeypatch):
    # a time limit hit before any integer solution: the greedy answer, flagged as not optimal
    errors, bits, numel = _instance(6)
    lo, hi = _budget_range(bits, numel)
    budget = (lo + hi) / 2
    monkeypatch.setattr(ba, "_solve_milp", lambda *args: (None, False))
    alloc = allocate_bits(errors, bits, numel, budget)
    assert not alloc.optimal and alloc.avg_bits <= budget + 1e-9
    assert alloc.total_error >= _total(errors, brute_force_allocation(errors, bits, numel, budget))


def test_table_and_dict_round_trip():
    errors, bits, numel = _instance(7)
    names = [f"layers.{i}.q_proj" for i in range(6)]
    configs = ["nf2-b64", "nf3-b64", "nf3-b256", "nf4-b64"]
    lo, hi = _budget_range(bits, numel)
    alloc = allocate_bits(errors, bits, numel, (lo + hi) / 2, names=names, config_names=configs)
    text = alloc.table()
    assert all(n in text for n in names) and f"{alloc.avg_bits:.4f}" in text and f"{alloc.budget_bits:.4f}" in text
    assert all(configs[c] in text for c in alloc.choice)
    assert len({len(line) for line in text.splitlines()[:-1]}) == 1  # aligned columns
    back = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())))
    assert back == alloc and back.table() == text
    assert alloc.configs == [configs[c] for c in alloc.choice]
