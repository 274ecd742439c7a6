"""Chunked cross-entropy vs the naive full-logits path: same loss, same gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.loss import IGNORE, lm_loss_sum


def naive(hidden, head, labels):
    logits = head(hidden).float()[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


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
