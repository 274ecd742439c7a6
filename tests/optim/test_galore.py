"""GaLoreAdamW (slimtune/optim/galore.py, projected.py) against hand-written references, torch's AdamW
and galore-torch's GaLoreAdamW."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtune.optim.galore import GaLoreAdamW
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


def signed_permutation_grad(m, n, seed=0):
    """(m, n) gradient whose columns are orthogonal with distinct norms: its SVD basis on the right
    side is a signed permutation of the coordinates (and of the rows' one on the left when m < n)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    q_left = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=gen))[0][:, :k]
    perm = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)][:k]
    if m >= n:  # G = Q diag(s) Pi: G^T G = Pi^T diag(s^2) Pi is diagonal
        return (q_left @ torch.diag(torch.linspace(3.0, 1.0, k, dtype=torch.float64)) @ perm).float()
    # m < n: left side, G G^T must be diagonal: rows orthogonal with distinct norms
    rows = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0][:, :m].T
    perm_m = torch.eye(m, dtype=torch.float64)[torch.randperm(m, generator=gen)]
    return (perm_m @ torch.diag(torch.linspace(3.0, 1.0, m, dtype=torch.float64)) @ rows).float()


# "GaLore with rank = full dimension equals AdamW" is only literally true when P is a signed permutation:
# Adam's second moment is elementwise, so with a general orthogonal P, Adam on G P^T is Adam in rotated
# coordinates, not Adam on G. What holds for every full-rank P (fixed: update_gap > steps) is
#   right: W_t = W'_t P with W' trained by AdamW from W_0 P^T on gradients G_t P^T   (left: W = P W').
# The three tests below check the exact case, the general rotated statement, and that a generic rotation
# really differs from plain AdamW (so the first test is not vacuous).


@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])
def test_full_rank_signed_permutation_basis_equals_adamw(shape):
    steps = 10
    grads = grads_like([shape], steps)
    grads[0][0] = signed_permutation_grad(*shape)  # P is fixed from step 0 on (update_gap > steps)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([ours], lr=1e-2, weight_decay=0.1, rank=min(shape), update_gap=1000, scale=1.0)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    run(opt, [ours], grads[:1])
    proj = opt.state[ours]["proj"]
    assert proj.shape == (min(shape), min(shape))
    torch.testing.assert_close(proj.abs().round(), proj.abs(), atol=1e-6, rtol=0)  # a signed permutation
    run(opt, [ours], grads[1:])
    run(ref_opt, [ref], grads)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])
def test_full_rank_equals_adamw_in_rotated_coordinates(shape):
    steps, lr, wd = 10, 1e-2, 0.1
    grads = grads_like([shape], steps, seed=2)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ours = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([ours], lr=lr, weight_decay=wd, rank=min(shape), update_gap=1000, scale=1.0)
    run(opt, [ours], grads)
    proj = opt.state[ours]["proj"]  # right: (n, n) rows = Vh; left: (m, m) columns = U
    torch.testing.assert_close(proj @ proj.T, torch.eye(min(shape)), atol=1e-5, rtol=0)
    right = shape[0] >= shape[1]
    to_rot = (lambda x: x @ proj.T) if right else (lambda x: proj.T @ x)
    ref = torch.nn.Parameter(to_rot(w0))
    run(torch.optim.AdamW([ref], lr=lr, weight_decay=wd, foreach=False), [ref], [[to_rot(g)] for (g,) in grads])
    back = ref.detach() @ proj if right else proj @ ref.detach()
    torch.testing.assert_close(ours.detach(), back, atol=1e-5, rtol=0)

    plain = torch.nn.Parameter(w0.clone())
    run(torch.optim.AdamW([plain], lr=lr, weight_decay=wd, foreach=False), [plain], grads)
    assert (ours - plain).abs().max() > 1e-3  # a generic rotation is not plain AdamW


def reference_galore(w, grads_seq, rank, lr, wd, eps, scale, update_gap):
    """GaLore from the formula, float64: right-side P = top-r Vh of the fp32 SVD (m >= n), else U."""
    w = w.double().clone()
    m = v = proj = None
    right = w.shape[0] >= w.shape[1]
    for t, g in enumerate(grads_seq, start=1):
        if (t - 1) % update_gap == 0:
            u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
            proj = (vh[:rank] if right else u[:, :rank]).double()
        g = g.double()
        low = g @ proj.T if right else proj.T @ g
        m = (1 - B1) * low if m is None else B1 * m + (1 - B1) * low
        v = (1 - B2) * low**2 if v is None else B2 * v + (1 - B2) * low**2
        direction = (m / (1 - B1**t)) / (torch.sqrt(v / (1 - B2**t)) + eps)
        update = scale * (direction @ proj if right else proj @ direction)
        w = w * (1 - lr * wd) - lr * update
    return w


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_one_step_matches_numpy_formula(shape):
    """Independent of torch's SVD: numpy float64 SVD (singular vectors' signs cancel in one Adam step)."""
    gen = torch.Generator().manual_seed(4)
    w0, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    rank, lr, wd, eps, scale = 5, 1e-2, 0.1, 1e-8, 0.25
    u, _, vh = np.linalg.svd(g.double().numpy(), full_matrices=False)
    right = shape[0] >= shape[1]
    proj = vh[:rank] if right else u[:, :rank]
    low = g.double().numpy() @ proj.T if right else proj.T @ g.double().numpy()
    m, v = (1 - B1) * low, (1 - B2) * low**2
    direction = (m / (1 - B1)) / (np.sqrt(v / (1 - B2)) + eps)
    expected = w0.double().numpy() * (1 - lr * wd) - lr * scale * (direction @ proj if right else proj @ direction)
    p = torch.nn.Parameter(w0.clone())
    run(GaLoreAdamW([p], lr=lr, weight_decay=wd, eps=eps, rank=rank, scale=scale), [p], [[g]])
    np.testing.assert_allclose(p.detach().double().numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_steps_across_projection_updates_match_reference(shape):
    grads = [gs[0] for gs in grads_like([shape], 7, seed=5)]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    kw = dict(rank=5, lr=1e-2, wd=0.1, eps=1e-8, scale=0.25, update_gap=3)
    p = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW(
        [p],
        lr=kw["lr"],
        weight_decay=kw["wd"],
        eps=kw["eps"],
        rank=kw["rank"],
        scale=kw["scale"],
        update_gap=kw["update_gap"],
    )
    run(opt, [p], [[g] for g in grads])
    expected = reference_galore(w0, grads, **kw)
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-5, rtol=0)


def test_reset_moments_on_update_restarts_them_from_the_new_projection():
    shape = (12, 8)
    grads = grads_like([shape], 4, seed=7)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = GaLoreAdamW([p], lr=1e-2, rank=3, update_gap=3, reset_moments_on_update=True)
    run(opt, [p], grads)  # the 4th step (step index 3) recomputes P, then zeroes the moments
    state = opt.state[p]
    low = grads[3][0] @ state["proj"].T
    torch.testing.assert_close(state["exp_avg"], (1 - B1) * low, atol=1e-6, rtol=0)
    torch.testing.assert_close(state["exp_avg_sq"], (1 - B2) * low**2, atol=1e-6, rtol=0)
    assert int(state["step"]) == 4  # bias correction keeps counting


@pytest.mark.parametrize("eps, atol", [(0.0, 1e-6), (1e-8, 1e-5)])
def test_matches_galore_torch(eps, atol):
    """galore-torch's AdamW computes denom = sqrt(v) + eps and folds both bias corrections into the step
    size, i.e. it uses eps / sqrt(1 - b2^t) where torch's AdamW (and slimtune) use eps: at t = 1 an
    effective eps 31.6x larger. With eps = 0 the two are the same arithmetic up to fp32 rounding (P is
    bit-identical), so 1e-6 over 15 steps (|w| ~ 3; observed 2.4e-7). With eps = 1e-8, at step 1
    d = g / (|g| + eps') moves by ~ (eps' - eps) / |g|: 3e-4 for the smallest projected entries
    (|g| ~ 1e-3), 8e-7 in the weights after lr * scale = 2.5e-3 (observed 1.1e-6), hence 1e-5.
    It also applies weight decay after the update (p -= lr*wd*p on the updated p), which differs by
    lr^2 * wd * update, so this compares with weight_decay = 0."""
    Reference = pytest.importorskip("galore_torch").GaLoreAdamW

    shapes = [(40, 24), (24, 40), (24,)]
    grads = grads_like(shapes, 15, seed=8)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(9 + i)) for i, s in enumerate(shapes)]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    lowrank = dict(rank=6, update_proj_gap=5, scale=0.25, proj_type="std")  # refreshes at steps 0, 5, 10
    opt = GaLoreAdamW(
        [{"params": ours[:2]}, {"params": ours[2:], "lowrank": False}],
        lr=1e-2,
        eps=eps,
        rank=6,
        update_gap=5,
        scale=0.25,
        proj_type="std",
    )
    ref = Reference(
        [{"params": theirs[:2], **lowrank}, {"params": theirs[2:]}], lr=1e-2, eps=eps, no_deprecation_warning=True
    )
    run(opt, ours, grads)
    run(ref, theirs, grads)
    for a, b, w in zip(ours, theirs, init):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
        assert (a - w).abs().max() > 1e-2  # the weights did move
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(opt.state[a]["proj"], ref.state[b]["projector"].ortho_matrix, atol=0, rtol=0)


@pytest.mark.parametrize("via_checkpoint", [False, True])
@pytest.mark.parametrize("state_bits", [32, 8])
def test_state_dict_roundtrip_is_bit_identical(via_checkpoint, state_bits, tmp_path):
    """12 steps straight, or 7 + save/load into a fresh optimizer + 5 (crossing the refresh at step 10).
    A bf16 parameter keeps fp32 P and moments (torch's loader alone would cast them, and 8-bit codes,
    to bf16). Checkpoint path: flatten_state -> safetensors + JSON -> unflatten_state."""
    shapes = [(160, 96), (96, 160), (12,)]  # rank-48 moments of 48 x 96 = 4608 values: 8-bit (>= 4096) when asked
    init = [torch.randn(s, generator=torch.Generator().manual_seed(20 + i)) for i, s in enumerate(shapes)]
    init[1] = init[1].bfloat16()
    grads = grads_like(shapes, 12, seed=30)

    def build(params):
        return GaLoreAdamW(
            [{"params": params[:2]}, {"params": params[2:], "lowrank": False}],
            lr=1e-2,
            weight_decay=0.1,
            rank=48,
            update_gap=5,
            scale=0.25,
            state_bits=state_bits,
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
    assert second.state[resumed[1]]["proj"].dtype == torch.float32
    quantized = ["exp_avg_q_int8" in second.state[p] for p in resumed]
    assert quantized == ([True, True, False] if state_bits == 8 else [False] * 3)  # the 1-D bias stays fp32


def test_non_2d_and_full_rank_groups_are_adamw():
    shapes = [(10, 6), (6,), (3, 4, 5), (7, 9)]
    grads = grads_like(shapes, 10, seed=40)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(41 + i)) for i, s in enumerate(shapes)]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    # (10, 6) in a lowrank: False group; (6,) and (3, 4, 5) are not 2-D; (7, 9) is projected (control)
    opt = GaLoreAdamW([{"params": ours[:1], "lowrank": False}, {"params": ours[1:]}], lr=1e-2, weight_decay=0.1, rank=2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    run(opt, ours, grads)
    run(ref, theirs, grads)
    for a, b in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert "proj" not in opt.state[a] and opt.state[a]["exp_avg"].shape == a.shape
    assert opt.state[ours[3]]["exp_avg"].shape == (2, 9)  # std: 7 < 9, left side, moments (r, n)
    assert (ours[3] - theirs[3]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "shape, moment_shape, proj_shape", [((512, 512), (512, 128), (128, 512)), ((256, 512), (128, 512), (256, 128))]
)
def test_state_elements(shape, moment_shape, proj_shape):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = GaLoreAdamW([p], lr=1e-3, rank=128)
    run(opt, [p], grads_like([shape], 1, seed=50))
    state = opt.state[p]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == moment_shape
    assert state["proj"].shape == proj_shape
    elements = sum(t.numel() for k, t in state.items() if k != "step")
    assert elements == 2 * moment_shape[0] * moment_shape[1] + proj_shape[0] * proj_shape[1]
    # P must not be a view that keeps the whole SVD factor alive
    assert state["proj"].untyped_storage().nbytes() == state["proj"].numel() * 4
    adamw_elements = 2 * shape[0] * shape[1]
    print(f"{shape} rank 128: {elements} state elements = {elements / adamw_elements:.3f}x AdamW's")
    assert elements / adamw_elements == (0.375 if shape == (512, 512) else 0.625)


def test_projection_seconds_accumulates():
    p = torch.nn.Parameter(torch.zeros(32, 16))
    opt = GaLoreAdamW([p], lr=1e-3, rank=4, update_gap=2)
    assert opt.projection_seconds == 0.0
    run(opt, [p], grads_like([(32, 16)], 1))
    first = opt.projection_seconds
    run(opt, [p], grads_like([(32, 16)], 1))  # step index 1: no refresh
    assert first > 0 and opt.projection_seconds == first
    run(opt, [p], grads_like([(32, 16)], 1))  # step index 2: refresh
    assert opt.projection_seconds > first


def test_invalid_arguments():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="proj_type"):
        GaLoreAdamW([p], lr=1e-3, proj_type="full")
    with pytest.raises(ValueError, match="state_bits"):
        GaLoreAdamW([p], lr=1e-3, state_bits=4)
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW([p], lr=1e-3, rank=0)
