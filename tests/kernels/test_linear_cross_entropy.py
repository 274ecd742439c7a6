"""linear_cross_entropy: Triton kernels (TRITON_INTERPRET=1 without CUDA), the chunked torch reference and
ChunkedLinearCE, each against an independent computation: F.cross_entropy(T(h @ W.T + b), y) with the
logits materialised and the logit transform T written out here (softcap * tanh(scale * z / softcap), or
scale * z). Nothing is compared with the function it calls."""

import pytest
from slimtune_testutil import use_kernels
import torch
import torch.nn.functional as F

from slimtune.kernels import linear_cross_entropy as lce
from slimtune.kernels.dispatch import interpreting
from slimtune.kernels.linear_cross_entropy import linear_cross_entropy
from slimtune.kernels.linear_cross_entropy_reference import ChunkedLinearCE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1"
)

# (N, V, H): ragged rows, vocab and hidden; 2-3 vocab tiles (two forward vocab slices, the last one short);
# H spanning two hidden tiles
SHAPES = [(37, 77, 40), (16, 16, 16), (9, 41, 7), (20, 130, 24), (70, 33, 80), (10, 300, 16)]
# (scale, softcap): Cohere-like and Granite-like scales, Gemma-2-like caps, and both
TRANSFORMS = [(0.25, None), (4.0, None), (1.0, 2.0), (0.5, 3.0)]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _naive(h, w, y, b, ignore_index=-100, reduction="sum", scale=1.0, softcap=None):
    """The independent computation: fp32 logits for every row, the transform spelled out, torch's CE."""
    z = h.float() @ w.float().T
    if b is not None:
        z = z + b.float()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction)


def _problem(n, v, hidden, bias=True, ignore_every=3, ignore_index=-100, dtype=torch.float32, seed=0, gain=2.0):
    """h ~ N(0, 1), W ~ N(0, gain^2 / H): raw logits ~ N(0, gain^2) (+ bias)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(v, hidden, generator=g) / hidden**0.5 * gain
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
    """got: fp32 0-d loss and grads; each grad's max error relative to that grad's largest entry."""
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


def _skip_without_kernel(name):
    if name == "triton" and DEVICE == "cpu" and not interpreting():
        pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    """Selects the backend, and checks after the test that its implementation ran and the other did not (a
    'triton' case that fell back to the reference would otherwise pass unnoticed)."""
    _skip_without_kernel(request.param)
    use_kernels(monkeypatch, request.param)
    calls = {"triton": 0, "reference": 0}
    for name, cls in (("triton", lce.LinearCrossEntropyFunction), ("reference", ChunkedLinearCE)):

        def counted(*args, _name=name, _apply=cls.apply, **kwargs):
            calls[_name] += 1
            return _apply(*args, **kwargs)

        monkeypatch.setattr(cls, "apply", counted)
    yield request.param
    other = "reference" if request.param == "triton" else "triton"
    assert calls[request.param] > 0 and calls[other] == 0, (request.param, calls)


@pytest.mark.parametrize("n,v,hidden", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_naive_cross_entropy(backend, n, v, hidden, reduction):
    h, w, b, y = _problem(n, v, hidden)
    got = _loss_and_grads(linear_cross_entropy, h, w, y, b, reduction=reduction)
    _assert_same(got, _loss_and_grads(_naive, h, w, y, b, reduction=reduction))


@pytest.mark.parametrize("scale,softcap", TRANSFORMS)
@pytest.mark.parametrize("n,v,hidden", [(37, 77, 40), (20, 130, 24)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_transform_matches_naive(backend, scale, softcap, n, v, hidden, reduction):
    """Loss and gradients wrt h, W and b with a logit transform; raw logits ~ N(0, 36), far past the caps."""
    h, w, b, y = _problem(n, v, hidden, gain=6.0, seed=1)
    kw = dict(reduction=reduction, scale=scale, softcap=softcap)
    want = _loss_and_grads(_naive, h, w, y, b, **kw)
    plain, transformed = float(_naive(h, w, y, b, reduction=reduction)), want[0].item()
    assert abs(plain - transformed) > 0.1 * abs(transformed)  # the transform matters
    _assert_same(_loss_and_grads(linear_cross_entropy, h, w, y, b, **kw), want)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_softcap_saturates_without_nan(backend, scale):
    """Raw logits up to ~500 x the cap: the kernel's tanh (via exp(2u)) overflows to inf and must still give
    +-cap and a zero chain-rule factor, like torch.tanh."""
    h, w, b, y = _problem(24, 70, 16, gain=150.0, seed=2)
    kw = dict(scale=scale, softcap=1.0)
    got = _loss_and_grads(linear_cross_entropy, h, w, y, b, **kw)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1])
    _assert_same(got, _loss_and_grads(_naive, h, w, y, b, **kw))


def test_no_bias_no_ignored_rows(backend):
    h, w, b, y = _problem(21, 50, 24, bias=False, ignore_every=0)
    _assert_same(_loss_and_grads(linear_cross_entropy, h, w, y, b), _loss_and_grads(_naive, h, w, y, b))


def test_custom_ignore_index(backend):
    h, w, b, y = _problem(19, 45, 16, ignore_every=2, ignore_index=7000)
    kw = dict(ignore_index=7000, reduction="mean", scale=0.5, softcap=3.0)
    _assert_same(_loss_and_grads(linear_cross_entropy, h, w, y, b, **kw), _loss_and_grads(_naive, h, w, y, b, **kw))


@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.5, 3.0)])
def test_frozen_weight_gets_no_grad(backend, scale, softcap):
    h, w, b, y = _problem(13, 40, 16, gain=6.0)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, y, b, scale=scale, softcap=softcap)
    loss.backward()
    assert not w.requires_grad and w.grad is None and b.grad is None
    want = torch.func.grad(lambda x: _naive(x, w, y, b, scale=scale, softcap=softcap))(h)
    torch.testing.assert_close(hh.grad, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_rows_ignored(monkeypatch, name, reduction):
    """0 (sum) or nan (mean), like F.cross_entropy; the reference returns before ChunkedLinearCE here, so
    this test selects the backend itself rather than through the `backend` fixture's checks."""
    _skip_without_kernel(name)
    use_kernels(monkeypatch, name)
    h, w, b, y = _problem(5, 20, 16, ignore_every=1)
    got, want = linear_cross_entropy(h, w, y, b, reduction=reduction), _naive(h, w, y, b, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.5, 3.0)])
def test_bf16_close_to_fp32_naive(backend, scale, softcap):
    """bf16 inputs: loss and grads against the fp32 computation on the same (bf16-valued) inputs; grads
    come back in bf16."""
    h, w, b, y = _problem(24, 70, 32, dtype=torch.bfloat16)
    kw = dict(reduction="mean", scale=scale, softcap=softcap)
    _assert_same(
        _loss_and_grads(linear_cross_entropy, h, w, y, b, **kw), _loss_and_grads(_naive, h, w, y, b, **kw), rtol=3e-2
    )


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), *TRANSFORMS])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_linear_ce_small_chunks(chunk, scale, softcap, bias):
    """ChunkedLinearCE itself (the reference's and lm_loss_sum's autograd Function): rows `chunk` at a time,
    gradients formed in forward, a non-unit upstream gradient applied in backward."""
    h, w, b, y = _problem(17, 45, 24, bias=bias, ignore_every=0, gain=6.0, seed=3)

    def chunked(h, w, y, b):
        return ChunkedLinearCE.apply(h, w, b, y, chunk, torch.float32, scale, softcap) * 0.5

    def naive(h, w, y, b):
        return _naive(h, w, y, b, scale=scale, softcap=softcap) * 0.5

    _assert_same(_loss_and_grads(chunked, h, w, y, b), _loss_and_grads(naive, h, w, y, b), rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
def test_reference_backend_small_chunks(monkeypatch, chunk):
    """linear_cross_entropy(chunk=...) on the reference backend, ignored rows dropped before chunking."""
    use_kernels(monkeypatch, "reference")
    h, w, b, y = _problem(12, 30, 8)
    kw = dict(reduction="mean", scale=4.0)
    _assert_same(
        _loss_and_grads(linear_cross_entropy, h, w, y, b, chunk=chunk, **kw), _loss_and_grads(_naive, h, w, y, b, **kw)
    )


def test_bad_arguments():
    h, w, b, y = _problem(4, 10, 8)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, b, reduction="none")
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy(h, w, torch.full_like(y, 10), b)
    with pytest.raises(ValueError, match="scale"):
        linear_cross_entropy(h, w, y, b, scale=0.0)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, y, b, softcap=-1.0)


@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.5, 3.0)])
def test_larger_shape(monkeypatch, scale, softcap):
    use_kernels(monkeypatch, "triton")
    h, w, b, y = _problem(300, 1000, 96, gain=6.0)
    kw = dict(reduction="mean", scale=scale, softcap=softcap)
    _assert_same(_loss_and_grads(linear_cross_entropy, h, w, y, b, **kw), _loss_and_grads(_naive, h, w, y, b, **kw))
