"""The trainer's hot paths reach the kernels: QLoRA's NF4 base runs nf4_matmul and the loss runs
linear_cross_entropy when dispatch picks Triton (CUDA, or here TRITON_INTERPRET=1), and give what the
torch paths give (SLIMTUNE_KERNELS=reference)."""

import pytest
from slimtune_testutil import use_kernels
import torch
import torch.nn as nn

from slimtune.kernels import linear_cross_entropy as lce
from slimtune.kernels import nf4_matmul as nf4k
from slimtune.kernels.dispatch import interpreting
from slimtune.quant.nf4 import NF4Linear
from slimtune.lm_loss import IGNORE, lm_loss_sum

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="the Triton kernels need CUDA or TRITON_INTERPRET=1"
)


def _spy(monkeypatch, cls):
    calls = []
    original = cls.apply

    def apply(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(cls, "apply", apply)
    return calls


def _nf4_step(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad


def test_nf4_linear_runs_the_kernel(monkeypatch):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 48).to(DEVICE))
    x = torch.randn(2, 5, 128, device=DEVICE)
    use_kernels(monkeypatch, "reference")
    want_y, want_dx = _nf4_step(layer, x)
    use_kernels(monkeypatch, "auto")
    calls = _spy(monkeypatch, nf4k.NF4MatmulFunction)
    y, dx = _nf4_step(layer, x)
    assert calls, "NF4Linear did not run the nf4_matmul kernel"
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, want_dx, rtol=1e-4, atol=1e-4)


def _loss_step(head, hidden, labels):
    hidden = hidden.clone().requires_grad_()
    head.zero_grad()
    loss = lm_loss_sum(hidden, head, labels, chunk_tokens=8)
    loss.backward()
    return loss.detach(), hidden.grad, head.weight.grad.clone()


def test_loss_runs_linear_cross_entropy_kernel(monkeypatch):
    torch.manual_seed(0)
    head = nn.Linear(32, 100, bias=False).to(DEVICE)
    hidden = torch.randn(2, 12, 32, device=DEVICE)
    labels = torch.randint(0, 100, (2, 12), device=DEVICE)
    labels[0, :4] = IGNORE  # a masked prompt
    use_kernels(monkeypatch, "reference")
    want = _loss_step(head, hidden, labels)
    use_kernels(monkeypatch, "auto")
    calls = _spy(monkeypatch, lce.LinearCrossEntropyFunction)
    got = _loss_step(head, hidden, labels)
    assert calls, "the trainer's loss did not run the linear_cross_entropy kernel"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", ["fp8", "halo2", "mxfp4"])
def test_training_linears_run_the_kernels(monkeypatch, make):
    """train.precision linears: Triton fp8_matmul / hadamard / mxfp4_matmul give the torch paths' result."""
    from slimtune.precision.fp8 import FP8Linear
    from slimtune.precision.quartet import QuartetLinear

    torch.manual_seed(0)
    lin = nn.Linear(64, 40).to(DEVICE)
    layer = {
        "fp8": lambda: FP8Linear.from_linear(lin),
        "halo2": lambda: FP8Linear.from_linear(lin, 2, 32),
        "mxfp4": lambda: QuartetLinear.from_linear(lin),
    }[make]()
    x = torch.randn(3, 7, 64, device=DEVICE)
    use_kernels(monkeypatch, "reference")
    want = layer(x)
    use_kernels(monkeypatch, "triton")
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    if make != "mxfp4":  # mxfp4's backward is stochastic
        triton_dx = torch.autograd.grad(layer(x.requires_grad_()).sum(), x)[0]
        use_kernels(monkeypatch, "reference")
        reference_dx = torch.autograd.grad(layer(x).sum(), x)[0]
        torch.testing.assert_close(triton_dx, reference_dx, rtol=2e-2, atol=2e-2)
