"""DCTAdamW (slimtune/optim/dct.py) against scipy's DCT, a brute-force index choice, a numpy reference of
the update formula and torch's AdamW (full rank)."""

import copy
import json
import time

import numpy as np
import pytest
import scipy.fft
import torch
from safetensors.torch import load_file, save_file

from slimtune.optim.dct import DCTAdamW, dct_indices, dct_matrix, dct_projection
from slimtune.optim.galore import svd_projection
from slimtune.io import flatten_state, unflatten_state

B1, B2 = 0.9, 0.999


def grads_like(shapes, steps, seed=0):
    """steps lists of random fp32 gradients, one per shape."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def run(opt, params, grads_seq):
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        opt.step()


def scipy_dct(n):
    """Orthonormal DCT-II as a matrix, rows = basis vectors: column j is the DCT of e_j."""
    return scipy.fft.dct(np.eye(n), norm="ortho", axis=0)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_dct_matrix_is_orthonormal_and_matches_scipy(n):
    d = dct_matrix(n)
    assert d.shape == (n, n) and d.dtype == torch.float32
    torch.testing.assert_close(d @ d.T, torch.eye(n), atol=1e-5, rtol=0)
    np.testing.assert_allclose(d.double().numpy(), scipy_dct(n), atol=1e-6, rtol=0)
    assert dct_matrix(n) is d  # built once, shared by every parameter of this size


@pytest.mark.parametrize("side, shape", [("right", (30, 20)), ("left", (20, 30)), ("left", (30, 20))])
def test_chosen_indices_maximise_the_captured_norm(side, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rank = 6
    gd = g.double().numpy()
    if side == "right":  # ||G @ D[k]|| for every basis vector k of size n
        scores = np.linalg.norm(gd @ scipy_dct(shape[1]).T, axis=0)
    else:  # ||D[k] @ G|| for every basis vector k of size m
        scores = np.linalg.norm(scipy_dct(shape[0]) @ gd, axis=1)
    expected = np.sort(np.argsort(-scores)[:rank])
    chosen = dct_indices(g, rank, side)
    assert chosen.dtype == torch.int64
    assert chosen.tolist() == expected.tolist()
    proj = dct_projection(chosen, shape[1] if side == "right" else shape[0], side)
    assert proj.shape == ((rank, shape[1]) if side == "right" else (shape[0], rank))


def reference_dct(w, grads_seq, rank, lr, wd, eps, scale, update_gap, side):
    """The DCT-projected AdamW update from the formula in numpy float64, with scipy's basis."""
    w = w.double().numpy().copy()
    m = v = proj = None
    for t, g in enumerate(grads_seq, start=1):
        g = g.double().numpy()
        if (t - 1) % update_gap == 0:
            if side == "right":
                d = scipy_dct(g.shape[1])
                proj = d[np.sort(np.argsort(-np.linalg.norm(g @ d.T, axis=0))[:rank])]  # (r, n)
            else:
                d = scipy_dct(g.shape[0])
                proj = d[np.sort(np.argsort(-np.linalg.norm(d @ g, axis=1))[:rank])].T  # (m, r)
        low = g @ proj.T if side == "right" else proj.T @ g
        m = (1 - B1) * low if m is None else B1 * m + (1 - B1) * low
        v = (1 - B2) * low**2 if v is None else B2 * v + (1 - B2) * low**2
        direction = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + eps)
        update = scale * (direction @ proj if side == "right" else proj @ direction)
        w = w * (1 - lr * wd) - lr * update
    return w


@pytest.mark.parametrize(
    "shape, proj_type, side", [((24, 16), "std", "right"), ((16, 24), "std", "left"), ((24, 16), "left", "left")]
)
def test_steps_match_reference(shape, proj_type, side):
    grads = [gs[0] for gs in grads_like([shape], 7, seed=1)]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    kw = dict(rank=5, lr=1e-2, wd=0.1, eps=1e-8, scale=0.25, update_gap=3)  # refreshes at steps 0, 3, 6
    p = torch.nn.Parameter(w0.clone())
    opt = DCTAdamW(
        [p],
        lr=kw["lr"],
        weight_decay=kw["wd"],
        eps=kw["eps"],
        rank=kw["rank"],
        scale=kw["scale"],
        update_gap=kw["update_gap"],
        proj_type=proj_type,
    )
    run(opt, [p], [grads[:1]])
    np.testing.assert_allclose(
        p.detach().double().numpy(), reference_dct(w0, grads[:1], side=side, **kw), atol=1e-6, rtol=0
    )
    run(opt, [p], [[g] for g in grads[1:]])
    np.testing.assert_allclose(
        p.detach().double().numpy(), reference_dct(w0, grads, side=side, **kw), atol=1e-5, rtol=0
    )
    assert opt.state[p]["exp_avg"].shape == ((shape[0], 5) if side == "right" else (5, shape[1]))


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_full_rank_is_adamw_in_dct_coordinates(shape):
    """rank = full: every index is chosen and kept in ascending order, so P = D itself (not a permutation
    of it) and the update is AdamW on W' = W D^T (right; D W on the left) with gradients G D^T: W = W' D."""
    lr, wd = 1e-2, 0.1
    grads = grads_like([shape], 10, seed=3)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    p = torch.nn.Parameter(w0.clone())
    opt = DCTAdamW([p], lr=lr, weight_decay=wd, rank=min(shape), update_gap=3, scale=1.0)
    run(opt, [p], grads)
    k = min(shape)
    assert opt.state[p]["proj_index"].tolist() == list(range(k))
    d = dct_matrix(k)
    right = shape[0] >= shape[1]
    to_rot = (lambda x: x @ d.T) if right else (lambda x: d @ x)
    ref = torch.nn.Parameter(to_rot(w0))
    run(torch.optim.AdamW([ref], lr=lr, weight_decay=wd, foreach=False), [ref], [[to_rot(g)] for (g,) in grads])
    back = ref.detach() @ d if right else d.T @ ref.detach()
    torch.testing.assert_close(p.detach(), back, atol=1e-5, rtol=0)


def test_state_holds_indices_not_matrices():
    p = torch.nn.Parameter(torch.zeros(512, 512))
    opt = DCTAdamW([p], lr=1e-3, rank=128)
    run(opt, [p], grads_like([(512, 512)], 1, seed=5))
    state = opt.state[p]
    assert "proj" not in state and state["proj_index"].shape == (128,)
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (512, 128)
    elements = sum(t.numel() for k, t in state.items() if k != "step")
    assert elements == 2 * 512 * 128 + 128  # vs AdamW's 2 * 512 * 512; D (512, 512) is shared per size


@pytest.mark.parametrize("via_checkpoint", [False, True])
def test_state_dict_roundtrip_is_bit_identical(via_checkpoint, tmp_path):
    """12 steps straight, or 7 + save/load into a fresh optimizer + 5 (crossing the refresh at step 10).
    The int64 indices and a bf16 parameter's fp32 moments must keep their dtypes (torch's loader would
    cast both to the parameter's dtype). Checkpoint path: flatten_state -> safetensors + JSON."""
    shapes = [(20, 12), (12, 20), (12,)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(20 + i)) for i, s in enumerate(shapes)]
    init[1] = init[1].bfloat16()
    grads = grads_like(shapes, 12, seed=30)

    def build(params):
        return DCTAdamW(
            [{"params": params[:2]}, {"params": params[2:], "lowrank": False}],
            lr=1e-2,
            weight_decay=0.1,
            rank=4,
            update_gap=5,
            scale=0.25,
        )

    def roundtrip(state_dict):
        if not via_checkpoint:
            return copy.deepcopy(state_dict)
        tensors, skeleton = flatten_state(state_dict)
        save_file(tensors, str(tmp_path / "opt.safetensors"))
        (tmp_path / "opt.json").write_text(json.dumps(skeleton))
        return unflatten_state(
            json.loads((tmp_path / "opt.json").read_text()), load_file(str(tmp_path / "opt.safetensors"))
        )

    straight = [torch.nn.Parameter(w.clone()) for w in init]
    opt = build(straight)
    run(opt, straight, grads)
    resumed = [torch.nn.Parameter(w.clone()) for w in init]
    first = build(resumed)
    run(first, resumed, grads[:7])
    second = build(resumed)
    second.load_state_dict(roundtrip(first.state_dict()))
    run(second, resumed, grads[7:])
    for a, b in zip(straight, resumed):
        assert a.dtype == b.dtype and torch.equal(a, b)
        sa, sb = opt.state[a], second.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert second.state[resumed[0]]["proj_index"].dtype == torch.int64
    assert second.state[resumed[1]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("n", [256, pytest.param(2048, marks=pytest.mark.slow)])
def test_projection_time_against_svd(n):
    """Prints the two times (timings are not asserted); both P must be orthonormal."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(6))
    rank = n // 16
    dct_matrix(n)  # built once per size in training too
    start = time.perf_counter()
    p_dct = DCTAdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0).compute_projection(g, rank, "right")
    dct_seconds = time.perf_counter() - start
    start = time.perf_counter()
    p_svd = svd_projection(g, rank, "right")
    svd_seconds = time.perf_counter() - start
    print(f"{n}x{n} rank {rank}: DCT projection {dct_seconds:.3f}s, SVD {svd_seconds:.3f}s")
    for proj in (p_dct, p_svd):
        assert proj.shape == (rank, n)
        torch.testing.assert_close(proj @ proj.T, torch.eye(rank), atol=1e-4, rtol=0)
