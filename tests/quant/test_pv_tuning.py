"""PV-Tuning (quant/pv_tuning.py): the V step is the exact minimiser of its objective over the grid with a
bounded number of changed codes (brute force over every assignment); with the paper's linearized target
(w_hat - eta g, eta = 1 / L) V steps never raise a least-squares loss; V steps walk the codes to the
straight-through buffer, a bounded number at a time; a PV linear computes with its codes, the optimizer leaves
them and a `qat.pv_tuning` run changes at most pv_fraction of them per step (tests/quant/test_qat.py)."""

import itertools
import math

import pytest
import torch

from slimtune.quant.fake import FakeQuantLinear, QuantFormatSpec
from slimtune.quant.learned_scales import initial_scales, packed_with
from slimtune.quant.packing import unpack_bits
from slimtune.quant.pv_tuning import PVTuning, codes_fixed_quantize, dequantize_codes, v_step


def _grid(fmt, scale, zero):
    """Every grid value of a block (one block here), ascending."""
    from slimtune.quant.intk import int_qmax
    from slimtune.quant.nfk import nf_codebook

    if fmt.kind == "nf":
        return (nf_codebook(fmt.bits) * scale).tolist()
    if fmt.kind == "int":
        q = int_qmax(fmt.bits, True)
        return (torch.arange(-q, q + 1, dtype=torch.float32) * scale).tolist()
    return (torch.arange(0, int_qmax(fmt.bits, False) + 1, dtype=torch.float32) * scale + zero).tolist()


@pytest.mark.parametrize("method, k", [("nf2", 1), ("int2", 2), ("int2a", 3), ("nf3", 2), ("int3", 6)])
def test_v_step_is_the_bounded_change_minimiser_of_its_objective(method, k):
    torch.manual_seed(hash(method) % 1000)
    fmt = QuantFormatSpec(method, block_size=6, double_quant=False).fmt
    w = torch.randn(1, 6)
    scale, zero = initial_scales(w, fmt)
    codes = packed_with(w, fmt, scale, zero).codes
    w_hat = dequantize_codes(codes, (1, 6), fmt, scale, zero)
    target = w_hat - 1.5 * scale.item() * torch.randn(1, 6)  # the paper's w_hat - eta g
    new = dequantize_codes(v_step(codes, target, scale, zero, fmt, k), (1, 6), fmt, scale, zero)

    def phi(v):
        return float(((v - target) ** 2).sum())

    levels = _grid(fmt, scale.item(), None if zero is None else zero.item())
    # each value: its own level or a neighbouring one (the V step's trust region)
    at = [min(range(len(levels)), key=lambda i, v=v: abs(levels[i] - v)) for v in w_hat[0].tolist()]
    choices = [levels[max(i - 1, 0) : i + 2] for i in at]
    best = min(
        phi(torch.tensor([cand]))
        for cand in itertools.product(*choices)
        if sum(c != levels[i] for c, i in zip(cand, at)) <= k
    )
    assert int((new != w_hat).sum()) <= k
    assert math.isclose(phi(new), best, rel_tol=1e-5, abs_tol=1e-7), (phi(new), best)
    assert all(min(abs(v - lv) for lv in levels) < 1e-6 for v in new[0].tolist())  # still on the grid


def _least_squares(seed):
    torch.manual_seed(seed)
    X = torch.randn(64, 8)
    y = X @ (torch.randn(8) * torch.linspace(0.3, 2.0, 8)) + 0.05 * torch.randn(64)
    w0 = torch.linalg.lstsq(X, y[:, None]).solution[:, 0][None]
    return X, y, w0, lambda w: ((X @ w[0] - y) ** 2).sum()


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_linearized_v_steps_never_raise_the_loss(seed):
    """With the target w_hat - eta g and eta = 1 / L (L = 2 lambda_max(X^T X)), phi majorizes the loss."""
    X, y, w0, loss = _least_squares(seed)
    fmt = QuantFormatSpec("nf2", block_size=8, double_quant=False).fmt
    eta = 1 / (2 * torch.linalg.eigvalsh(X.T @ X).max().item())
    scale, _ = initial_scales(w0, fmt)
    codes = packed_with(w0, fmt, scale, None).codes
    for _ in range(20):
        w = dequantize_codes(codes, (1, 8), fmt, scale, None).requires_grad_(True)
        before = loss(w)
        (g,) = torch.autograd.grad(before, [w])
        codes = v_step(codes, w.detach() - eta * g, scale, None, fmt, 2)
        assert loss(dequantize_codes(codes, (1, 8), fmt, scale, None)).item() <= before.item() * (1 + 1e-6)


@pytest.mark.parametrize("method", ["nf3", "int2a"])
def test_v_steps_walk_the_codes_to_the_buffer(method):
    """With the buffer held, repeated V steps (k codes each) lower |w_hat - W| every step, change at most k codes
    each, and end at W's round-to-nearest codes under the same scales."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 4, bias=False)
    fake = FakeQuantLinear.from_linear(lin, QuantFormatSpec(method, block_size=16, double_quant=False), pv=True)
    with torch.no_grad():
        fake.weight.add_(0.3 * torch.randn_like(fake.weight))  # the buffer moved by some P steps
    hook, k = PVTuning([fake], fraction=3 / 128), 3
    goal = packed_with(fake.weight, fake.spec.fmt, fake.qat_scale, fake.qat_zero).codes

    def state():
        with torch.no_grad():
            return fake.qat_codes.clone(), float((fake.quantized_weight() - fake.weight).pow(2).sum())

    codes, dist = state()
    for step in range(200):
        hook.before_step(None, step)
        new_codes, new_dist = state()
        bits = fake.spec.fmt.bits
        changed = int((unpack_bits(new_codes, bits, 128) != unpack_bits(codes, bits, 128)).sum())
        if torch.equal(new_codes, codes):
            break
        assert new_dist < dist and changed <= k
        codes, dist = new_codes, new_dist
    assert torch.equal(fake.qat_codes, goal)


def test_codes_fixed_gradients_match_autograd():
    """d w_hat / d s = q(codes), d w_hat / d z = 1 (summed per block), and the buffer gets w_hat's gradient."""
    torch.manual_seed(0)
    fmt = QuantFormatSpec("int3a", block_size=16, double_quant=False).fmt
    w = torch.randn(4, 16, requires_grad=True)
    scale, zero = initial_scales(w.detach(), fmt)
    scale.requires_grad_(True), zero.requires_grad_(True)
    codes = packed_with(w.detach(), fmt, scale, zero).codes
    g = torch.randn(4, 16)
    (codes_fixed_quantize(w, scale, zero, codes, fmt) * g).sum().backward()
    unit = dequantize_codes(codes, (4, 16), fmt, torch.ones(4), torch.zeros(4)).view(4, 16)
    s, z = scale.detach().clone().requires_grad_(True), zero.detach().clone().requires_grad_(True)
    ((unit * s[:, None] + z[:, None]) * g).sum().backward()  # the asymmetric grid written out: q * s + z
    assert torch.allclose(scale.grad, s.grad) and torch.allclose(zero.grad, z.grad) and torch.equal(w.grad, g)


def test_pv_linear_holds_its_codes_and_the_optimizer_leaves_them():
    from slimtune.optim import build_optimizer
    from slimtune.schema import OptimConfig

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    spec = QuantFormatSpec("int3", block_size=32)
    original = lin.weight.detach().clone()
    fake = FakeQuantLinear.from_linear(lin, spec, pv=True)
    assert torch.equal(fake.weight, original)  # the buffer starts at the full-precision weight
    assert torch.equal(fake.qat_codes, spec.packed(original).codes)  # the codes at round to nearest
    named = [(n, p) for n, p in fake.named_parameters() if p.requires_grad]
    opt = build_optimizer(OptimConfig(), named, 1e-3)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(fake.qat_codes) not in ids and {id(fake.qat_scale), id(fake.weight), id(fake.bias)} <= ids
