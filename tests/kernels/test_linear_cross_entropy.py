"""linear_cross_entropy: Triton kernels (TRITON_INTERPRET=1 without CUDA) and the chunked torch reference
against the naive F.cross_entropy(h @ W.T + b, y) with materialised logits."""

import pytest
from slimtune_testutil import use_kernels
import torch
import torch.nn.functional as F

from slimtune.kernels.dispatch import interpreting
from slimtune.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                  reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")

# (N, V, H): ragged rows, vocab and hidden; 2-3 vocab tiles (two forward vocab slices, the last one short);
# H spanning two hidden tiles
SHAPES = [(37, 77, 40), (16, 16, 16), (9, 41, 7), (20, 130, 24), (70, 33, 80), (10, 300, 16)]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _naive(h, w, y, b, ignore_index=-100, reduction="sum"):
    logits = h.float() @ w.float().T + (b.float() if b is not None else 0.0)
    return F.cross_entropy(logits, y, ignore_index=ignore_index, reduction=reduction)


def _problem(n, v, hidden, bias=True, ignore_every=3, ignore_index=-100, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(v, hidden, generator=g) / hidden**0.5 * 2
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = ignore_index
    out = [t.to(DEVICE, dtype) if t is not None else None for t in (h, w, b)]
    return (*out, y.to(DEVICE))


def _loss_and_grads(fn, h, w, y, b, **kw):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    loss = fn(leaves[0], leaves[1], y, leaves[2], **kw)
    loss.backward()
    return loss, [t.grad if t is not None else None for t in leaves]


def _assert_same(got, want, rtol=1e-4):
    (loss, grads), (want_loss, want_grads) = got, want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, want_loss.float(), rtol=rtol, atol=rtol)
    for g, wg in zip(grads, want_grads):
        if wg is None:
            assert g is None
            continue
        scale = wg.float().abs().max().clamp_min(1e-6)
        err = (g.float() - wg.float()).abs().max() / scale
        assert g.dtype == wg.dtype and err < rtol, f"grad max error {err:.2e} relative to {scale:.3g}"


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    if request.param == "triton" and DEVICE == "cpu" and not interpreting():
        pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")
    use_kernels(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("n,v,hidden", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_naive_cross_entropy(backend, n, v, hidden, reduction):
    h, w, b, y = _problem(n, v, hidden)
    got = _loss_and_grads(linear_cross_entropy, h, w, y, b, reduction=reduction)
    _assert_same(got, _loss_and_grads(_naive, h, w, y, b, reduction=reduction))


def test_no_bias_no_ignored_rows(backend):
    h, w, b, y = _problem(21, 50, 24, bias=False, ignore_every=0)
    _assert_same(_loss_and_grads(linear_cross_entropy, h, w, y, b), _loss_and_grads(_naive, h, w, y, b))


def test_custom_ignore_index(backend):
    h, w, b, y = _problem(19, 45, 16, ignore_every=2, ignore_index=7000)
    got = _loss_and_grads(linear_cross_entropy, h, w, y, b, ignore_index=7000, reduction="mean")
    _assert_same(got, _loss_and_grads(_naive, h, w, y, b, ignore_index=7000, reduction="mean"))


def test_frozen_weight_gets_no_grad(backend):
    h, w, b, y = _problem(13, 40, 16)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, y, b)
    loss.backward()
    torch.testing.assert_close(hh.grad, torch.func.grad(lambda x: _naive(x, w, y, b))(h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_rows_ignored(backend, reduction):
    h, w, b, y = _problem(5, 20, 16, ignore_every=1)
    got, want = linear_cross_entropy(h, w, y, b, reduction=reduction), _naive(h, w, y, b, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)


@needs_kernel
def test_kernel_matches_reference_bf16(monkeypatch):
    h, w, b, y = _problem(24, 70, 32, dtype=torch.bfloat16)
    results = []
    for name in ("triton", "reference"):
        use_kernels(monkeypatch, name)
        results.append(_loss_and_grads(linear_cross_entropy, h, w, y, b, reduction="mean"))
    _assert_same(*results, rtol=3e-2)


def test_bad_arguments():
    h, w, b, y = _problem(4, 10, 8)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, b, reduction="none")
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy(h, w, torch.full_like(y, 10), b)


def test_reference_is_the_chunked_torch_path(monkeypatch):
    use_kernels(monkeypatch, "reference")
    h, w, b, y = _problem(12, 30, 8)
    torch.testing.assert_close(linear_cross_entropy(h, w, y, b), linear_cross_entropy_reference(h, w, y, b))


@pytest.mark.slow
@needs_kernel
def test_larger_shape(monkeypatch):
    use_kernels(monkeypatch, "triton")
    h, w, b, y = _problem(300, 1000, 96)
    _assert_same(_loss_and_grads(linear_cross_entropy, h, w, y, b, reduction="mean"),
                 _loss_and_grads(_naive, h, w, y, b, reduction="mean"))
