"""SpIEL sparse fine-tuning: the sparse product against a dense S (values, autograd, gradcheck), the adapter on
nn.Linear and NF4 bases, drop/grow on a hand-built case with AdamW state surgery, and the regrowth statistics
against the dense gradient computed by autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from slimtune.adapters import sparse_ft
from slimtune.adapters.sparse_ft import (
    SparseFTConfig,
    SparseFTLinear,
    drop_fraction_at,
    grad_square_sums,
    in_accumulation_window,
    module_seed,
    pick_path,
    remap_adam_state,
    sparse_delta_linear,
)
from slimtune.optim.adamw import AdamW
from slimtune.quant import NF4Linear
from slimtune.registry import ADAPTERS


def _random_sparse(out_f: int, in_f: int, k: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_f * in_f, generator=g)[:k]  # unsorted on purpose: the op must not need order
    return flat // in_f, flat % in_f, torch.randn(k, generator=g, dtype=dtype)


def _dense(rows, cols, values, out_f, in_f):
    return torch.zeros(out_f, in_f, dtype=values.dtype).index_put_((rows, cols), values)


@pytest.mark.parametrize("path", ["gather", "dense"])
@pytest.mark.parametrize("shape", [(2, 5, 8, 6, 10), (7, 9, 5, 1)])  # (..., in, out, k); (7, 9) tokens, 1 entry
def test_sparse_delta_linear_matches_dense(path, shape):
    *lead, in_f, out_f, k = shape
    rows, cols, values = _random_sparse(out_f, in_f, k)
    x = torch.randn(*lead, in_f, requires_grad=True)
    v = values.clone().requires_grad_(True)
    y = sparse_delta_linear(x, rows, cols, v, out_f, path=path)
    x_ref = x.detach().clone().requires_grad_(True)
    s = _dense(rows, cols, values, out_f, in_f).requires_grad_(True)
    y_ref = x_ref @ s.T
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(v.grad, s.grad[rows, cols], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["gather", "dense"])
def test_gradcheck_float64(path):
    rows, cols, values = _random_sparse(4, 3, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    v = values.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, v: sparse_delta_linear(x, rows, cols, v, 4, path=path), (x, v))


def test_gather_chunks_over_tokens_and_auto_path(monkeypatch):
    rows, cols, values = _random_sparse(6, 8, 7)
    x = torch.randn(13, 8)
    whole = sparse_delta_linear(x, rows, cols, values, 6, path="gather")
    monkeypatch.setattr(sparse_ft, "CHUNK_ELEMENTS", 20)  # 2 tokens x 7 entries per chunk: ragged last chunk
    torch.testing.assert_close(sparse_delta_linear(x, rows, cols, values, 6, path="gather"), whole)
    assert pick_path(4, 10, 6, 8) == "gather" and pick_path(5, 10, 6, 8) == "dense"  # 40 <= 48 < 50


def test_autocast_bf16_computes_in_bf16():
    rows, cols, values = _random_sparse(6, 8, 9)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_delta_linear(x, rows, cols, values, 6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ _dense(rows, cols, values, 6, 8).T, rtol=5e-2, atol=5e-2)


def test_adapter_on_linear_output_density_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    m = SparseFTLinear(base, density=0.1, seed=3)
    k = round(0.1 * 16 * 12)
    assert m.num_params == k and m.indices.dtype == torch.int64
    assert torch.equal(m.indices, torch.unique(m.indices))  # sorted, unique
    assert torch.equal(SparseFTLinear(nn.Linear(16, 12), density=0.1, seed=3).indices, m.indices)
    assert not torch.equal(SparseFTLinear(nn.Linear(16, 12), density=0.1, seed=4).indices, m.indices)
    assert SparseFTLinear(nn.Linear(16, 12), num_params=5).num_params == 5
    assert SparseFTLinear(nn.Linear(4, 2), density=1e-6).num_params == 1  # at least one entry
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(m(x), base(x))  # deltas start at 0
    with torch.no_grad():
        m.deltas.copy_(torch.randn(k))
    dense = m.delta_weight()
    assert dense.count_nonzero() == k and torch.equal(dense.view(-1)[m.indices], m.deltas.detach())
    y = m(x)
    torch.testing.assert_close(y, x @ (base.weight + dense).T + base.bias, rtol=1e-5, atol=1e-5)
    assert m.trainable_parameters() == [m.deltas]
    assert [p for p in m.parameters() if p.requires_grad] == [m.deltas]

    w0 = base.weight.detach().clone()
    m.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    torch.testing.assert_close(base.weight.detach(), w0 + dense)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert torch.equal(base.weight, w0)  # bit for bit: the k previous values were kept
    torch.testing.assert_close(m(x), y)


def test_from_config_registry_and_module_seed():
    assert ADAPTERS.get("sparse_ft") is SparseFTLinear
    m = SparseFTLinear.from_config(nn.Linear(10, 10), SparseFTConfig(density=0.25, seed=1))
    assert m.num_params == 25 and m.seed == 1
    assert SparseFTLinear.from_config(nn.Linear(100, 10), SparseFTConfig()).num_params == 10  # density 0.01
    a = SparseFTLinear.from_config(nn.Linear(10, 10), SparseFTConfig(density=0.25, seed=1), name="layers.0.q_proj")
    b = SparseFTLinear.from_config(nn.Linear(10, 10), SparseFTConfig(density=0.25, seed=1), name="layers.1.q_proj")
    assert a.seed == module_seed(1, "layers.0.q_proj") and not torch.equal(a.indices, b.indices)
    with pytest.raises(ValueError, match="exactly one"):
        SparseFTLinear(nn.Linear(4, 4))


def test_adapter_on_nf4_base_trains_only_deltas():
    torch.manual_seed(1)
    base = NF4Linear.from_linear(nn.Linear(64, 32))
    m = SparseFTLinear(base, density=0.05, seed=0)
    assert [p for p in m.parameters() if p.requires_grad] == [m.deltas]
    with torch.no_grad():
        m.deltas.normal_()
    x = torch.randn(4, 64)
    y = m(x)
    ref = x @ (base.dequantize_weight(torch.float32) + m.delta_weight()).T + base.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert m.deltas.grad is not None and m.deltas.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="export"):
        m.merge()


def _hand_built():
    """(3, 4) weight, active flat indices [1, 5, 6, 10] with |delta| 0.5, 0.1, 0.1, 2.0."""
    m = SparseFTLinear(nn.Linear(4, 3), num_params=4)
    with torch.no_grad():
        m.indices.copy_(torch.tensor([1, 5, 6, 10]))
        m.deltas.copy_(torch.tensor([0.5, -0.1, 0.1, 2.0]))
    scores = torch.zeros(3, 4)
    scores.view(-1)[torch.tensor([10, 5, 0, 11, 3])] = torch.tensor([100.0, 99.0, 50.0, 40.0, 30.0])
    return m, scores


def test_reselect_drops_smallest_and_grows_best_inactive():
    m, scores = _hand_built()
    param = m.deltas
    # n=1: |0.1| ties between flat 5 and 6: the lower index (5) goes; 10 is active and 5 just dropped, so 0 grows
    old_to_new, new_to_old = m.reselect(1, scores)
    assert m.indices.tolist() == [0, 1, 6, 10] and m.deltas.tolist() == pytest.approx([0.0, 0.5, 0.1, 2.0])
    assert old_to_new.tolist() == [1, -1, 2, 3] and new_to_old.tolist() == [-1, 0, 2, 3]
    assert m.deltas is param

    m, scores = _hand_built()
    opt = AdamW([m.deltas], lr=0.1)
    m(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    state = opt.state[m.deltas]
    before = {key: state[key].clone() for key in ("exp_avg", "exp_avg_sq")}
    step, values = state["step"].clone(), m.deltas.detach().clone()
    old_to_new, new_to_old = m.reselect(2, scores)  # drops flat 5 and 6, grows 0 and 11 (not 10, 5)
    assert m.indices.tolist() == [0, 1, 10, 11] and m.num_params == 4
    assert m.deltas.tolist() == pytest.approx([0.0, values[0].item(), values[3].item(), 0.0])
    assert new_to_old.tolist() == [-1, 0, 3, -1] and old_to_new.tolist() == [1, -1, -1, 2]
    assert m.deltas.grad[0] == 0 and m.deltas.grad[3] == 0  # a stale grad moves with its entries
    remap_adam_state(state, old_to_new, m.num_params)
    for key in before:
        assert state[key].tolist() == pytest.approx([0.0, before[key][0].item(), before[key][3].item(), 0.0])
    assert torch.equal(state["step"], step)
    opt.step()  # the optimizer still holds the same parameter and state


def test_reselect_score_blocks_match_dense_scores(monkeypatch):
    torch.manual_seed(0)
    a = SparseFTLinear(nn.Linear(8, 6), density=0.25, seed=5)
    b = SparseFTLinear(nn.Linear(8, 6), density=0.25, seed=5)
    with torch.no_grad():
        a.deltas.normal_()
        b.deltas.copy_(a.deltas)
    scores = torch.randn(6, 8)
    a.reselect(4, scores)
    monkeypatch.setattr(sparse_ft, "CHUNK_ELEMENTS", 16)  # two rows of scores per block
    b.reselect(4, lambda r0, r1: scores[r0:r1])
    assert torch.equal(a.indices, b.indices) and torch.equal(a.deltas, b.deltas)
    assert a.indices.numel() == 12 and torch.equal(a.indices, torch.unique(a.indices))


def test_remap_torch_adamw_state():
    p = nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(3)
    opt.step()
    st = opt.state[p]
    m, v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    remap_adam_state(st, torch.tensor([2, -1, 0]), 3)
    assert torch.equal(st["exp_avg"], torch.stack([m[2], torch.tensor(0.0), m[0]]))
    assert torch.equal(st["exp_avg_sq"], torch.stack([v[2], torch.tensor(0.0), v[0]]))
    with pytest.raises(ValueError, match="8-bit"):
        remap_adam_state({"exp_avg_q_int8": torch.zeros(3)}, torch.arange(3), 3)


def test_schedule():
    assert drop_fraction_at(10, 10, 0.2, 100) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.1)))
    assert drop_fraction_at(50, 10, 0.2, 100) == pytest.approx(0.1)
    assert drop_fraction_at(90, 10, 0.2, 100) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.9)))
    assert [drop_fraction_at(s, 10, 0.2, 100) for s in (0, 5, 100, 110)] == [0.0] * 4
    # reselect every 10 steps after 3 accumulation steps: steps 8, 9, 10 then 18, 19, 20
    assert [s for s in range(1, 21) if in_accumulation_window(s, 10, 3)] == [8, 9, 10, 18, 19, 20]


def _dense_grads(m: SparseFTLinear, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Autograd's gradient of each step's loss w.r.t. a dense copy of the effective weight W + delta."""
    grads = []
    for x in xs:
        w = (m.base.weight.detach() + m.delta_weight()).requires_grad_(True)
        (x @ w.T + m.base.bias).square().sum().backward()
        grads.append(w.grad)
    return grads


@pytest.mark.parametrize("path", ["gather", "dense"])
def test_grad_accumulator_sums_dense_gradients(path):
    torch.manual_seed(0)
    m = SparseFTLinear(nn.Linear(8, 6), density=0.2)
    m.path = path
    with torch.no_grad():
        m.deltas.normal_()
    xs = [torch.randn(3, 4, 8) for _ in range(3)]
    m(xs[0]).square().sum().backward()  # outside the window: no buffer
    assert m.grad_acc.grad is None and m.regrow_stats() == []
    m.grad_acc.start()
    for x in xs:
        m(x).square().sum().backward()
    torch.testing.assert_close(m.grad_acc.grad, sum(_dense_grads(m, xs)), rtol=1e-5, atol=1e-4)
    assert m.regrow_stats() == [m.grad_acc.grad]
    scores = m.grad_acc.grad.abs().clone()
    m.regrow(0.5, "ag")
    assert m.grad_acc.grad is None and not m.grad_acc.active  # freed after reselection
    grown = m.indices[m.deltas == 0]  # every kept delta is nonzero (normal draws)
    assert grown.numel() == round(0.5 * m.num_params)
    assert scores.view(-1)[grown].min() > 0


@pytest.mark.parametrize("method", ["gram", "blocked", "auto"])
def test_grad_square_sums_equal_dense_formula(method, monkeypatch):
    torch.manual_seed(0)
    x, dy = torch.randn(11, 7), torch.randn(11, 5)
    g = dy.T @ x
    monkeypatch.setattr(sparse_ft, "CHUNK_ELEMENTS", 24)  # several token / row blocks
    row, col = grad_square_sums(x, dy, method)
    torch.testing.assert_close(row, g.square().sum(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(col, g.square().sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["gather", "dense"])
def test_sm3_stats_accumulate_row_col_sums(path):
    torch.manual_seed(0)
    m = SparseFTLinear(nn.Linear(8, 6), density=0.2)
    m.path = path
    m.sm3.decay = 0.5
    with torch.no_grad():
        m.deltas.normal_()
    xs = [torch.randn(5, 8) for _ in range(2)]
    m.sm3.start()
    for x in xs:
        m(x).square().sum().backward()
    g0, g1 = _dense_grads(m, xs)
    row = 0.5 * g0.square().sum(1) + g1.square().sum(1)
    col = 0.5 * g0.square().sum(0) + g1.square().sum(0)
    torch.testing.assert_close(m.sm3.row, row, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.sm3.col, col, rtol=1e-4, atol=1e-4)
    assert m.regrow_stats() == [m.sm3.row, m.sm3.col]
    torch.testing.assert_close(m.growth_scores("ma")(1, 3), torch.outer(row[1:3], col) / row.sum())
    m.sm3.score = "min"
    torch.testing.assert_close(m.growth_scores("ma")(0, 6), torch.minimum(row[:, None], col[None, :]))
    indices = m.indices.clone()
    old_to_new, _ = m.regrow(0.25, "ma")
    assert (old_to_new < 0).sum() == int(0.25 * m.num_params) and not torch.equal(m.indices, indices)
    assert m.sm3.row is not None  # SM3 statistics persist


def test_regrow_state_round_trip():
    torch.manual_seed(0)
    m = SparseFTLinear(nn.Linear(8, 6), density=0.2)
    m.grad_acc.start()
    m.sm3.start()
    m(torch.randn(3, 8)).sum().backward()
    saved = {key: t.clone() for key, t in m.regrow_state().items()}
    assert sorted(saved) == ["ag_grad", "sm3_col", "sm3_row"]
    fresh = SparseFTLinear(nn.Linear(8, 6), density=0.2)
    assert fresh.regrow_state() == {}
    fresh.load_regrow_state(saved)
    assert fresh.grad_acc.active and fresh.sm3.active
    for key, t in fresh.regrow_state().items():
        assert torch.equal(t, saved[key])


def test_remap_can_seed_grown_second_moments_with_the_kept_mean():
    st = {
        "step": torch.tensor(7.0),
        "exp_avg": torch.tensor([1.0, 2.0, 3.0]),
        "exp_avg_sq": torch.tensor([4.0, 5.0, 9.0]),
    }
    remap_adam_state(st, torch.tensor([2, -1, 0]), 3, grown="mean")
    assert st["exp_avg"].tolist() == [3.0, 0.0, 1.0]  # a grown entry's first moment is 0
    assert st["exp_avg_sq"].tolist() == [9.0, 6.5, 4.0]  # its second moment: the mean of the kept (4, 9)
