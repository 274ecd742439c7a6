"""slimtune.lm_loss.lm_loss_sum vs the naive full-logits path: same loss, same gradients, with and without a
model family's logit transform, on each of its paths."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.kernels.linear_cross_entropy_reference import ChunkedLinearCE
from slimtune.lm_loss import IGNORE, LogitTransform, lm_loss_sum
from slimtune_testutil import use_kernels


def naive(hidden, head, labels):
    logits = head(hidden).float()[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


@pytest.mark.parametrize("shape", [(2, 33, 16, 101), (3, 17, 8, 41), (1, 64, 32, 257)])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_chunked_matches_naive(shape, train_head, bias, chunk):
    B, T, H, V = shape
    torch.manual_seed(0)
    head = nn.Linear(H, V, bias=bias)
    head.weight.requires_grad_(train_head)
    if bias:
        head.bias.requires_grad_(train_head)
    hidden = torch.randn(B, T, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, : T // 3] = IGNORE  # a masked prompt

    ref = naive(hidden, head, labels)
    ref.backward()
    ref_h = hidden.grad.clone()
    ref_w = head.weight.grad.clone() if train_head else None
    hidden.grad = None
    head.zero_grad()

    out = lm_loss_sum(hidden, head, labels, chunk)
    (out * 0.5).backward()  # a non-unit upstream gradient must be honoured
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad, ref_h * 0.5, rtol=1e-5, atol=1e-6)
    if train_head:
        torch.testing.assert_close(head.weight.grad, ref_w * 0.5, rtol=1e-5, atol=1e-6)
        if bias:
            assert head.bias.grad is not None
    else:
        assert head.weight.grad is None


def test_generic_head_uses_checkpointed_chunks():
    """A head that is not a plain nn.Linear (e.g. LoRA-wrapped) goes through per-chunk checkpointing."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 37))
    hidden = torch.randn(2, 21, 8, requires_grad=True)
    labels = torch.randint(0, 37, (2, 21))
    ref = naive(hidden, head, labels)
    ref.backward()
    g_ref = [p.grad.clone() for p in head.parameters()] + [hidden.grad.clone()]
    head.zero_grad()
    hidden.grad = None
    out = lm_loss_sum(hidden, head, labels, chunk_tokens=5)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip([p.grad for p in head.parameters()] + [hidden.grad], g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_path_and_all_masked():
    head = nn.Linear(8, 11)
    hidden = torch.randn(2, 9, 8)
    labels = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm_loss_sum(hidden, head, labels, 4), naive(hidden, head, labels))
    labels[:] = IGNORE
    assert float(lm_loss_sum(hidden, head, labels, 4)) == 0.0


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    ref = naive(hidden, head, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_loss_sum(hidden, head, labels, 8)
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


# Logit transforms (Gemma-2's soft cap, Cohere's / Granite's scale, and both), written out here rather than
# taken from slimtune.lm_loss.LogitTransform: T(z) = softcap * tanh(scale * z / softcap), or scale * z.
TRANSFORMS = [(0.25, None), (4.0, None), (1.0, 2.0), (0.5, 3.0)]
# raw logits |z| up to ~15: far past the caps, and scaling changes the loss by far more than the tolerance
HEAD_GAIN = 6.0


def transformed_naive(hidden, head, labels, scale, softcap):
    z = head(hidden).float()[:, :-1] * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


def _transform_problem(head):
    torch.manual_seed(1)
    last = head[-1] if isinstance(head, nn.Sequential) else head
    with torch.no_grad():
        for p in last.parameters():
            p.mul_(HEAD_GAIN)
    hidden = torch.randn(2, 19, 16, requires_grad=True)
    labels = torch.randint(0, 53, (2, 19))
    labels[1, :5] = IGNORE
    return hidden, labels


@pytest.fixture
def paths(monkeypatch):
    """Counts which lm_loss_sum path ran: ChunkedLinearCE (plain head with grad) or checkpointed chunks."""
    import slimtune.lm_loss as loss_mod

    seen = {"chunked_ce": 0, "checkpoint": 0}
    apply, ckpt = ChunkedLinearCE.apply, loss_mod.checkpoint

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ChunkedLinearCE, "apply", counted("chunked_ce", apply))
    monkeypatch.setattr(loss_mod, "checkpoint", counted("checkpoint", ckpt))
    use_kernels(monkeypatch, "reference")  # the CPU path: a Triton run is covered in tests/kernels
    return seen


def _grads(params):
    return [p.grad.clone() if p.grad is not None else None for p in params]


def _check_transform_case(head, scale, softcap, chunk, paths, want_path):
    hidden, labels = _transform_problem(head)
    params = [hidden, *head.parameters()]
    ref = transformed_naive(hidden, head, labels, scale, softcap)
    ref.backward()
    ref_grads = _grads(params)
    for p in params:
        p.grad = None
    with torch.no_grad():  # the transform matters here
        assert abs(float(transformed_naive(hidden, head, labels, 1.0, None)) - ref.item()) > 1.0

    out = lm_loss_sum(hidden, head, labels, chunk, LogitTransform(scale, softcap))
    (out * 0.5).backward()
    assert paths[want_path] > 0 and sum(paths.values()) == paths[want_path], paths
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for p, g, r in zip(params, _grads(params), ref_grads):
        if r is None:
            assert g is None
        else:
            want = r * 0.5  # fp32 summation-order error grows with the gradient's size
            torch.testing.assert_close(g, want, rtol=1e-5, atol=2e-6 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("scale,softcap", TRANSFORMS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_transform_plain_head_with_grad(scale, softcap, bias, train_head, chunk, paths):
    torch.manual_seed(0)
    head = nn.Linear(16, 53, bias=bias)
    head.requires_grad_(train_head)
    _check_transform_case(head, scale, softcap, chunk, paths, "chunked_ce")


@pytest.mark.parametrize("scale,softcap", TRANSFORMS)
@pytest.mark.parametrize("chunk", [5, 4096])
def test_transform_generic_head_with_grad(scale, softcap, chunk, paths):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 53))  # not a plain nn.Linear: checkpointed chunks
    _check_transform_case(head, scale, softcap, chunk, paths, "checkpoint")


@pytest.mark.parametrize("scale,softcap", TRANSFORMS)
@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("chunk", [0, 5, 4096])
def test_transform_no_grad(scale, softcap, generic, chunk, paths):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 53)) if generic else nn.Linear(16, 53)
    hidden, labels = _transform_problem(head)
    with torch.no_grad():
        ref = transformed_naive(hidden, head, labels, scale, softcap)
        assert abs(float(transformed_naive(hidden, head, labels, 1.0, None)) - float(ref)) > 1.0
        out = lm_loss_sum(hidden, head, labels, chunk, LogitTransform(scale, softcap))
    assert sum(paths.values()) == 0, paths  # neither autograd path
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scale,softcap", TRANSFORMS)
def test_transform_naive_path_with_grad(scale, softcap, paths):
    """chunk_tokens=0: plain autograd through the full (transformed) logits."""
    torch.manual_seed(0)
    head = nn.Linear(16, 53)
    hidden, labels = _transform_problem(head)
    ref = transformed_naive(hidden, head, labels, scale, softcap)
    out = lm_loss_sum(hidden, head, labels, 0, LogitTransform(scale, softcap))
    assert sum(paths.values()) == 0, paths
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    g_out = torch.autograd.grad(out, [hidden, head.weight, head.bias])
    g_ref = torch.autograd.grad(ref, [hidden, head.weight, head.bias])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
