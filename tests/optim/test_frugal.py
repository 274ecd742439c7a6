"""FRUGAL against independent references: torch.optim.AdamW, signSGD and a float64 formula written here."""

import copy
import math

import pytest
import torch

from slimtune.optim import states8bit  # noqa: F401  (plain import: a regression there must fail, not skip)
from slimtune.optim.frugal import FRUGAL
from slimtune.io import flatten_state, unflatten_state

SPLIT = ("svd", "random", "blocks", "coordinates")
ALL = SPLIT + ("modules",)
BETAS, EPS = (0.9, 0.999), 1e-8


def tensors(shapes, seed, steps=None, dtype=torch.float32):
    """Weights (steps None) or `steps` lists of gradients, from a local generator (never the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    if steps is None:
        return [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    return [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype).clone()
        opt.step()


def mask_from_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """The optimizer's packed mask read bit by bit (bit j of byte i is entry 8 i + j)."""
    flat = [(byte >> j) & 1 for byte in bits.tolist() for j in range(8)][: math.prod(shape)]
    return torch.tensor(flat, dtype=torch.bool).view(shape)


def subspace_maps(state, kind, shape):
    """(project, back) in float64 for the subspace stored in `state` (right side when m >= n)."""
    right = shape[0] >= shape[1]
    if kind in ("svd", "random"):
        P = state["proj"].double()
        return ((lambda g: g @ P.T), (lambda x: x @ P)) if right else ((lambda g: P.T @ g), (lambda x: P @ x))
    if kind == "blocks":
        where = (slice(None), state["index"]) if right else (state["index"],)
    else:
        where = mask_from_bits(state["mask_bits"], shape)

    def back(x):
        out = torch.zeros(shape, dtype=torch.float64)
        out[where] = x
        return out

    return (lambda g: g[where]), back


def reference_frugal(w, grads, project, back, lr, wd, scale):
    """The FRUGAL formula in float64 with a fixed subspace: Adam on project(g), signSGD on the rest."""
    w, m, v = w.double(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g.double()
        low = project(g)
        m = BETAS[0] * m + (1 - BETAS[0]) * low
        v = BETAS[1] * v + (1 - BETAS[1]) * low**2
        d = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        w = w * (1 - lr * wd) - lr * (back(d) + scale * torch.sign(g - back(low)))
    return w


@pytest.mark.parametrize("kind", ["blocks", "coordinates", "modules"])
def test_density_one_is_adamw(kind):
    """The whole space state-full is AdamW; literal for entry subsets (before the first reselection,
    which zeroes the moments as the paper's code does). svd/random: see the rotated-Adam test below."""
    shapes = [(12, 8), (6, 10), (5,)]
    ours = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    ref = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    grads = tensors(shapes, 1, steps=10)
    run(FRUGAL(ours, lr=1e-2, weight_decay=0.1, density=1.0, subspace=kind), ours, grads)
    run(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False), ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["svd", "random"])
def test_full_rank_projection_is_adam_in_a_rotated_basis_not_adamw(kind):
    """At full rank P is orthogonal: Adam runs on G P^T and the residual is exactly zero (no sign step).
    Adam's elementwise second moment is not rotation invariant, so this differs from AdamW."""
    shape = (12, 8)
    w0, grads = tensors([shape], 0)[0], [g[0] for g in tensors([shape], 1, steps=5)]
    p = torch.nn.Parameter(w0.clone())
    opt = FRUGAL([p], lr=1e-2, weight_decay=0.1, density=1.0, subspace=kind)
    run(opt, [p], [[g] for g in grads])
    project, back = subspace_maps(opt.state[p], kind, shape)
    torch.testing.assert_close(opt.state[p]["proj"] @ opt.state[p]["proj"].T, torch.eye(8), atol=1e-5, rtol=0)
    expected = reference_frugal(w0, grads, project, back, 1e-2, 0.1, scale=0.0)  # zero residual: no sign step
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=0)
    q = torch.nn.Parameter(w0.clone())
    run(torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False), [q], [[g] for g in grads])
    assert (p - q).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ALL)
def test_density_zero_is_sign_sgd(kind):
    shapes = [(12, 8), (6, 10)]
    lr, wd, scale = 2.0**-6, 0.25, 0.5  # powers of two: the reference's products round like the optimizer's
    params = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    expected = [w.clone() for w in tensors(shapes, 0)]
    grads = tensors(shapes, 1, steps=3)
    opt = FRUGAL(params, lr=lr, weight_decay=wd, density=0.0, subspace=kind, inactive_lr_scale=scale)
    run(opt, params, grads)
    for step_grads in grads:
        expected = [w * (1 - lr * wd) - lr * scale * torch.sign(g) for w, g in zip(expected, step_grads)]
    for p, w in zip(params, expected):
        assert torch.equal(p.detach(), w)
        assert not any(key.startswith("exp_avg") for key in opt.state[p])


@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])
@pytest.mark.parametrize("kind", SPLIT)
def test_quarter_density_matches_the_formula(kind, shape):
    w0, grads = tensors([shape], 0)[0], [g[0] for g in tensors([shape], 1, steps=3)]
    p = torch.nn.Parameter(w0.clone())
    opt = FRUGAL([p], lr=1e-2, weight_decay=0.1, density=0.25, subspace=kind, inactive_lr_scale=0.5)
    run(opt, [p], [[g] for g in grads])
    state, dim, numel = opt.state[p], min(shape), math.prod(shape)
    if kind == "svd":  # our own SVD of the first gradient: the top-2 right (tall) or left (wide) vectors
        u, _, vh = torch.linalg.svd(grads[0].double(), full_matrices=False)
        basis = vh[:2] if shape[0] >= shape[1] else u[:, :2].T
        stored = state["proj"].double() if shape[0] >= shape[1] else state["proj"].double().T
        torch.testing.assert_close(stored.T @ stored, basis.T @ basis, atol=1e-5, rtol=0)
        state = {"proj": basis if shape[0] >= shape[1] else basis.T}
    elif kind == "random":
        proj = state["proj"] if shape[0] >= shape[1] else state["proj"].T
        assert proj.shape == (round(0.25 * dim), dim)
        torch.testing.assert_close(proj @ proj.T, torch.eye(proj.shape[0]), atol=1e-5, rtol=0)
    elif kind == "blocks":
        index = state["index"]
        assert index.dtype == torch.int64 and len(set(index.tolist())) == len(index) == math.ceil(0.25 * dim)
    else:
        assert int(mask_from_bits(state["mask_bits"], shape).sum()) == round(0.25 * numel)
    project, back = subspace_maps(state, kind, shape)
    expected = reference_frugal(w0, grads, project, back, 1e-2, 0.1, 0.5)
    torch.testing.assert_close(p.detach().double(), expected, atol=2e-6, rtol=0)


def subspace_tensors(state):
    return {k: v.clone() for k, v in state.items() if k in ("proj", "index", "mask_bits")}


@pytest.mark.parametrize("kind", SPLIT)
def test_reselection_changes_the_subspace_and_resets_the_moments(kind):
    shape = (16, 8)
    grads = [g[0] for g in tensors([shape], 1, steps=3)]
    p = torch.nn.Parameter(tensors([shape], 0)[0])
    opt = FRUGAL([p], lr=1e-2, density=0.25, subspace=kind, update_gap=2)
    run(opt, [p], [[g] for g in grads[:2]])
    before = subspace_tensors(opt.state[p])
    assert float(opt.state[p]["step"]) == 2
    run(opt, [p], [[grads[2]]])  # the third step reselects with the third gradient
    state = opt.state[p]
    after = subspace_tensors(state)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # documented transformation: zeroed moments and a restarted step, then one Adam update
    project, _ = subspace_maps(state, kind, shape)
    low = project(grads[2].double())
    assert float(state["step"]) == 1 and state["frugal_step"] == 3
    torch.testing.assert_close(state["exp_avg"].double(), (1 - BETAS[0]) * low, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"].double(), (1 - BETAS[1]) * low**2, atol=1e-9, rtol=1e-5)
    if kind == "svd":  # the new basis is the top-2 right singular space of the third gradient
        vh = torch.linalg.svd(grads[2].double(), full_matrices=False)[2][:2]
        proj = state["proj"].double()
        torch.testing.assert_close(proj.T @ proj, vh.T @ vh, atol=1e-5, rtol=0)


def test_modules_pick_whole_parameters_and_reset_on_reselection():
    shapes = [(6, 4)] * 8 + [(3,)]
    params = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    grads = tensors(shapes, 1, steps=5)
    opt = FRUGAL(params, lr=1e-2, density=0.5, subspace="modules", update_gap=2)
    patterns = []
    for t, step_grads in enumerate(grads):
        run(opt, params, [step_grads])
        active = [opt.state[p]["active"] for p in params[:8]]
        assert sum(active) == 4 and "active" not in opt.state[params[8]]  # the 1-D bias is plain AdamW
        for p, g, on in zip(params, step_grads, active):
            if on and t % 2 == 0:  # just reselected: fresh moments holding one gradient
                assert float(opt.state[p]["step"]) == 1
                torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - BETAS[0]) * g, atol=1e-7, rtol=1e-6)
            if not on:
                assert set(opt.state[p]) == {"active", "frugal_step"}
        patterns.append(active)
    assert patterns[0] == patterns[1] and patterns[2] == patterns[3] and len({tuple(a) for a in patterns}) > 1


def test_modules_step_matches_the_formula():
    """Active parameters take Adam's first step g / (|g| + eps), the others signSGD."""
    shapes = [(6, 4)] * 8
    lr, wd, scale = 1e-2, 0.1, 0.5
    w0, grads = tensors(shapes, 0), tensors(shapes, 1, steps=1)
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = FRUGAL(params, lr=lr, weight_decay=wd, density=0.25, subspace="modules", inactive_lr_scale=scale)
    run(opt, params, grads)
    assert sum(opt.state[p]["active"] for p in params) == 2
    for p, w, g in zip(params, w0, grads[0]):
        g = g.double()
        step = g / (g.abs() + EPS) if opt.state[p]["active"] else scale * torch.sign(g)
        torch.testing.assert_close(p.detach().double(), w.double() * (1 - lr * wd) - lr * step, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ALL)
def test_subspace_depends_on_the_seed_argument_not_the_global_rng(kind):
    """Two ranks with differently seeded global RNGs (torchrun) must choose the same subspaces."""
    shapes = [(12, 8), (6, 10)] * 2
    grads = tensors(shapes, 1, steps=5)

    def train(global_seed, seed):
        torch.manual_seed(global_seed)
        params = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
        opt = FRUGAL(params, lr=1e-2, density=0.5, subspace=kind, update_gap=2, seed=seed)
        history = []  # the subspaces chosen at each step, to compare seeds
        for step_grads in grads:
            torch.rand(3)  # the ranks' global streams drift apart
            rng = torch.get_rng_state()
            run(opt, params, [step_grads])
            assert torch.equal(rng, torch.get_rng_state())  # the optimizer never touches it
            history += [(opt.state[p].get("active"), subspace_tensors(opt.state[p])) for p in params]
        return params, opt, history

    (pa, a, ha), (pb, b, _), (_, _, hc) = train(1, 0), train(2, 0), train(1, 7)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for key, value in a.state[x].items():
            same = torch.equal(value, b.state[y][key]) if torch.is_tensor(value) else value == b.state[y][key]
            assert same, key
    if kind != "svd":  # svd is a function of the gradient alone; the others must follow `seed`
        assert any(sa != sc or any(not torch.equal(ta[k], tc[k]) for k in ta) for (sa, ta), (sc, tc) in zip(ha, hc))


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


@pytest.mark.parametrize("kind", ALL)
def test_state_dict_round_trip_continues_bit_identically(kind):
    shapes = [(12, 8), (6, 10), (8, 8), (5,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    make = lambda ps: FRUGAL(ps, lr=1e-2, weight_decay=0.1, density=0.5, subspace=kind, update_gap=3, seed=3)
    params = [torch.nn.Parameter(w.to(dt)) for w, dt in zip(tensors(shapes, 0), dtypes)]
    grads = tensors(shapes, 1, steps=7)
    opt = make(params)
    run(opt, params, grads[:2])
    saved = opt.state_dict()
    via_torch, via_io = clone_params(params), clone_params(params)
    opt_torch, opt_io = make(via_torch), make(via_io)
    opt_torch.load_state_dict(copy.deepcopy(saved))
    flat, skeleton = flatten_state(saved)
    opt_io.load_state_dict(unflatten_state(skeleton, flat))
    for o, ps in ((opt, params), (opt_torch, via_torch), (opt_io, via_io)):
        run(o, ps, grads[2:])  # crosses the reselection at step 3 and 6
    for o, ps in ((opt_torch, via_torch), (opt_io, via_io)):
        for p, q in zip(params, ps):
            assert torch.equal(p, q) and p.dtype == q.dtype
            assert opt.state[p].keys() == o.state[q].keys()
            for key, value in opt.state[p].items():
                if torch.is_tensor(value):
                    assert value.dtype == o.state[q][key].dtype and torch.equal(value, o.state[q][key]), key
                else:
                    assert value == o.state[q][key]
    if kind != "modules":
        assert opt.state[params[1]]["exp_avg"].dtype == torch.float32  # bf16 param, fp32 moments


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize(
    "kind, bits, ratio",
    [
        ("blocks", 32, 0.3),
        ("coordinates", 32, 0.3),
        ("modules", 32, 0.3),
        ("svd", 32, 0.38),
        ("random", 32, 0.38),
        ("random", 8, 0.3),
    ],
)
def test_state_bytes_at_quarter_density(kind, bits, ratio):
    """512x512 at density 0.25: moments are 0.25 of AdamW's; blocks add 128 indices, coordinates a
    bit mask (1/64 of AdamW). svd/random also keep P (128, 512) in fp32, 0.125 of AdamW: 0.375 in all
    (under 0.3 with 8-bit moments). modules: 1 of 4 parameters state-full."""
    n_params = 4 if kind == "modules" else 1
    shapes = [(512, 512)] * n_params
    grads = tensors(shapes, 1, steps=1)
    ours = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    ref = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    opt = FRUGAL(ours, lr=1e-3, density=0.25, subspace=kind, state_bits=bits)
    adamw = torch.optim.AdamW(ref, lr=1e-3, foreach=False)
    run(opt, ours, grads)
    run(adamw, ref, grads)
    assert state_bytes(opt) <= ratio * state_bytes(adamw)
    if kind in ("svd", "random") and bits == 32:
        assert state_bytes(opt) >= 0.375 * state_bytes(adamw) - 64


def test_non_lowrank_groups_and_vectors_are_adamw():
    shapes = [(10, 6), (5,)]
    ours = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    ref = [torch.nn.Parameter(w) for w in tensors(shapes, 0)]
    grads = tensors(shapes, 1, steps=10)
    opt = FRUGAL(
        [{"params": [ours[0]], "lowrank": False}, {"params": [ours[1]]}],
        lr=1e-2,
        weight_decay=0.1,
        density=0.25,
        subspace="random",
    )
    run(opt, ours, grads)
    run(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False), ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert opt.state[ours[0]]["exp_avg"].shape == (10, 6)


@pytest.mark.parametrize("kind", ALL)
def test_bf16_parameter_is_updated_in_fp32(kind):
    """A bf16 parameter takes the fp32 step of its values and is rounded once, at the end."""
    shapes = [(12, 8), (6, 10)]
    w, g = tensors(shapes, 0, dtype=torch.bfloat16), tensors(shapes, 1, steps=1, dtype=torch.bfloat16)
    half = [torch.nn.Parameter(x.clone()) for x in w]
    full = [torch.nn.Parameter(x.float()) for x in w]
    make = lambda ps: FRUGAL(ps, lr=1e-2, weight_decay=0.1, density=0.5, subspace=kind)
    opt = make(half)
    run(opt, half, g)
    run(make(full), full, [[x.float() for x in g[0]]])
    for h, f in zip(half, full):
        assert h.dtype == torch.bfloat16 and torch.equal(h, f.to(torch.bfloat16))
    assert opt.projection_seconds > 0


def test_parameters_without_gradients_are_untouched():
    p, q = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    opt = FRUGAL([p, q], lr=0.1, weight_decay=0.5)
    p.grad = torch.ones(4, 4)
    opt.step()
    assert torch.equal(q, torch.ones(4, 4)) and len(opt.state[q]) == 0


@pytest.mark.parametrize("kwargs", [{"subspace": "rows"}, {"density": 1.5}, {"update_gap": 0}, {"state_bits": 4}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        FRUGAL([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, **kwargs)
