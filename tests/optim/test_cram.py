"""CrAM+ (optim/cram.py): the gradient handed to the base optimizer vs the formula computed here by autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from slimtune.io import flatten_state, unflatten_state
from slimtune.optim.cram import CrAM, compression_mask


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def loss_at(model: nn.Module, params: list[torch.Tensor], x, y) -> torch.Tensor:
    out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], params)), (x,))
    return ((out - y) ** 2).mean()


def topk_keep(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Written independently: keep the entries whose |w| ranks in the top (1 - s) * numel."""
    k = w.numel() - round(sparsity * w.numel())
    order = w.abs().flatten().argsort(descending=True)
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view_as(w)


def expected_grad(model, x, y, rho: float, sparsity: float, plus: bool) -> list[torch.Tensor]:
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    g = torch.autograd.grad(loss_at(model, w, x, y), w)
    perturbed = [wi + rho * gi for wi, gi in zip(w, g)]
    keeps = [topk_keep(pi, sparsity) if pi.dim() >= 2 else None for pi in perturbed]
    w_tilde = [(pi * k if k is not None else pi).detach().requires_grad_(True) for pi, k in zip(perturbed, keeps)]
    g_tilde = torch.autograd.grad(loss_at(model, w_tilde, x, y), w_tilde)
    g_tilde = [gt * k if k is not None else gt for gt, k in zip(g_tilde, keeps)]
    return [gt + gi if plus else gt for gt, gi in zip(g_tilde, g)]


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("plus", [True, False])
def test_base_step_gets_the_cram_gradient(plus):
    model, (x, y) = mlp(), data()
    before = [p.detach().clone() for p in model.parameters()]
    want = expected_grad(model, x, y, rho=0.1, sparsity=0.7, plus=plus)
    # SGD with lr=1 and no momentum: the step is exactly -grad
    opt = CrAM(torch.optim.SGD(model.parameters(), lr=1.0), rho=0.1, sparsities=[0.7], plus=plus)
    loss = opt.step(closure_for(model, opt, x, y))
    torch.testing.assert_close(loss, ((mlp()(x) - y) ** 2).mean())  # the loss at w, not at w~
    for p, w0, g in zip(model.parameters(), before, want):
        torch.testing.assert_close(w0 - p.detach(), g, rtol=1e-5, atol=1e-6)


def test_closure_free_api_matches_the_closure_api():
    x, y = data()
    a, b = mlp(), mlp()
    opt_a = CrAM(torch.optim.AdamW(a.parameters(), lr=1e-2), rho=0.05, sparsities=[0.3, 0.6, 0.9], seed=3)
    opt_b = CrAM(torch.optim.AdamW(b.parameters(), lr=1e-2), rho=0.05, sparsities=[0.3, 0.6, 0.9], seed=3)
    for _ in range(3):
        opt_a.step(closure_for(a, opt_a, x, y))
        opt_a.zero_grad()
        ((b(x) - y) ** 2).mean().backward()  # the trainer's own backward at w
        opt_b.perturb()
        assert all(p.grad is None for p in b.parameters())
        ((b(x) - y) ** 2).mean().backward()  # ... and at w~
        opt_b.restore()  # where a trainer would clip the combined gradient
        opt_b.step()
        opt_b.zero_grad()
        assert opt_a.last_choice == opt_b.last_choice
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_one_d_params_are_perturbed_but_not_compressed():
    model, (x, y) = mlp(), data()
    opt = CrAM(torch.optim.SGD(model.parameters(), lr=1.0), rho=0.1, sparsities=[0.9])
    w = [p.detach().clone() for p in model.parameters()]
    ((model(x) - y) ** 2).mean().backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.perturb()
    for p, w0, g0 in zip(model.parameters(), w, g):
        if p.dim() == 1:
            torch.testing.assert_close(p.detach(), w0 + 0.1 * g0)
        else:
            assert (p == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    ((model(x) - y) ** 2).mean().backward()
    opt.restore()
    assert all(torch.equal(p.detach(), w0) for p, w0 in zip(model.parameters(), w))


def test_seeded_sparsity_draws_are_reproducible():
    def draws(seed):
        model, (x, y) = mlp(), data()
        opt = CrAM(torch.optim.SGD(model.parameters(), lr=0.01), sparsities=[0.5, 0.7, 0.9], seed=seed)
        out = []
        for _ in range(8):
            opt.step(closure_for(model, opt, x, y))
            out.append(opt.last_choice)
        return out

    assert draws(1) == draws(1)
    assert len(set(draws(1))) > 1 and draws(1) != draws(2)


def test_state_dict_round_trip_continues_identically():
    x, y = data()
    model = mlp()
    opt = CrAM(torch.optim.AdamW(model.parameters(), lr=1e-2), sparsities=[0.5, 0.8], seed=0)
    for _ in range(2):
        opt.step(closure_for(model, opt, x, y))
    clone = copy.deepcopy(model)
    state = unflatten_state(*reversed(flatten_state(opt.state_dict())))  # through the checkpoint format
    resumed = CrAM(torch.optim.AdamW(clone.parameters(), lr=1e-2), sparsities=[0.5, 0.8], seed=99)
    resumed.load_state_dict(state)
    assert resumed.param_groups is resumed.base.param_groups and resumed.state is resumed.base.state
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
        resumed.step(closure_for(clone, resumed, x, y))
        assert opt.last_choice == resumed.last_choice
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_step_post_hooks_run_once_per_cram_step():
    model, (x, y) = mlp(), data()
    opt = CrAM(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    opt.step(closure_for(model, opt, x, y))
    assert calls == [1]


def test_lr_set_on_the_wrapper_reaches_the_base():
    model = mlp()
    opt = CrAM(torch.optim.SGD(model.parameters(), lr=1.0))
    for group in opt.param_groups:
        group["lr"] = 0.25
    assert all(g["lr"] == 0.25 for g in opt.base.param_groups)


def test_nm_mask_keeps_n_of_every_m_along_the_last_dim():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    keep = compression_mask(w, (2, 4))
    assert (keep.view(6, 4, 4).sum(-1) == 2).all()
    groups, kept = w.abs().view(-1, 4), keep.view(-1, 4)
    assert (groups[kept].view(-1, 2).min(-1).values >= groups[~kept].view(-1, 2).max(-1).values).all()
    assert compression_mask(torch.randn(3, 6), (2, 4)) is None  # 6 is not a multiple of 4
    assert compression_mask(w, 0.0) is None
    assert not compression_mask(w, 1.0).any()


def test_nm_training_step_uses_the_nm_mask():
    model, (x, y) = mlp(), data()
    opt = CrAM(torch.optim.SGD(model.parameters(), lr=1.0), nm=[(2, 4), (4, 8)], seed=0)
    ((model(x) - y) ** 2).mean().backward()
    opt.perturb()
    n, m = opt.last_choice
    for p in model.parameters():
        if p.dim() == 2:
            assert ((p.detach() != 0).view(-1, m).sum(-1) == n).all()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


def test_rejects_bad_arguments():
    params = mlp().parameters()
    with pytest.raises(ValueError):
        CrAM(torch.optim.SGD(params, lr=1.0), sparsities=[1.5])
    with pytest.raises(ValueError):
        CrAM(torch.optim.SGD(mlp().parameters(), lr=1.0), nm=(4, 2))
