"""Recovery losses (prune/distill.py) against formulas written out here on fully materialised logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.prune.distill import RecoveryLoss, Teacher, capture_layer_outputs, kd_loss_sum, squarehead_loss
from slimtune.lm_loss import CausalLMLoss, LogitTransform
from slimtune.engines.ddp import activation_checkpointing


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="module")
def pair():
    student = tiny_llama(0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():  # a "dense teacher" that differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 7] = -100
    return student, teacher, ids, labels


def kd_reference(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * sum_{targets} sum_v p_t (log p_t - log p_s) on full (B, T, V) logits; position t predicts labels[t+1]."""
    log_p = torch.log_softmax(zt[:, :-1].double() / temperature, dim=-1)
    log_q = torch.log_softmax(zs[:, :-1].double() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T-1)
    return (kl * (labels[:, 1:] != -100)).sum() * temperature**2


@pytest.mark.parametrize("chunk", [0, 3, 1000])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.7, softcap=5.0)])
def test_kd_sum_matches_full_logits_and_its_gradient(chunk, transform):
    torch.manual_seed(0)
    B, T, H, V, temp = 2, 7, 16, 11, 2.0
    head_s, head_t = nn.Linear(H, V), nn.Linear(H, V, bias=False)
    head_t.requires_grad_(False)
    hs = torch.randn(B, T, H, requires_grad=True)
    ht = torch.randn(B, T, H)
    labels = torch.randint(0, V, (B, T))
    labels[0, 2], labels[1, 5], labels[1, 0] = -100, -100, -100
    got = kd_loss_sum(hs, ht, head_s, head_t, labels, temp, chunk, transform, LogitTransform(softcap=3.0))
    got.backward()
    got_grads = (hs.grad.clone(), head_s.weight.grad.clone())
    hs.grad, head_s.weight.grad, head_s.bias.grad = None, None, None
    want = kd_reference(transform(head_s(hs)), LogitTransform(softcap=3.0)(head_t(ht)), labels, temp)
    want.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grads[0], hs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_grads[1], head_s.weight.grad, rtol=1e-4, atol=1e-6)
    assert head_t.weight.grad is None


def test_kd_sum_zero_for_identical_models_and_for_no_targets():
    torch.manual_seed(0)
    head = nn.Linear(8, 5)
    h = torch.randn(1, 6, 8, requires_grad=True)
    labels = torch.randint(0, 5, (1, 6))
    assert abs(kd_loss_sum(h, h.detach(), head, head, labels, 1.5, 2).item()) < 1e-5
    none = kd_loss_sum(h, h.detach(), head, head, torch.full_like(labels, -100), 1.0, 2)
    none.backward()
    assert none.item() == 0.0 and h.grad is not None


def test_squarehead_is_the_normalised_squared_error_averaged_over_layers():
    torch.manual_seed(0)
    s = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 5, 8) * (i + 1) for i in range(3)]
    got = squarehead_loss(s, t)
    want = sum(((a - b) ** 2).sum() / (b**2).sum() for a, b in zip(s, t)) / 3
    torch.testing.assert_close(got, want)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    want_masked = sum(((a - b)[mask] ** 2).sum() / (b[mask] ** 2).sum() for a, b in zip(s, t)) / 3
    torch.testing.assert_close(squarehead_loss(s, t, mask), want_masked)
    assert float(squarehead_loss(t, t)) == 0.0
    with pytest.raises(ValueError):
        squarehead_loss(s, t[:2])


def test_capture_layer_outputs_records_each_layer_then_unhooks(pair):
    student, _, ids, _ = pair
    with torch.no_grad():  # transformers >= 5 installs its own output-recording hooks on first use
        student(ids, output_hidden_states=True)
    hooks_before = [dict(layer._forward_hooks) for layer in student.model.layers]
    before_norm = []
    h = student.model.norm.register_forward_pre_hook(lambda m, args: before_norm.append(args[0]))
    with torch.no_grad(), capture_layer_outputs(student) as outs:
        ref = student(ids, output_hidden_states=True).hidden_states
    h.remove()
    assert len(outs) == 2
    assert torch.equal(outs[0], ref[1]) and torch.equal(outs[1], before_norm[0])
    assert [dict(layer._forward_hooks) for layer in student.model.layers] == hooks_before


def test_recovery_loss_ce_only_is_causal_lm_loss_and_runs_no_teacher(pair):
    student, teacher_model, ids, labels = pair

    class Refuse(Teacher):
        def hidden_states(self, *args, **kwargs):
            raise AssertionError("teacher forward with kd = feature = 0")

    ref = CausalLMLoss(student, 5)(ids, labels)
    for teacher in (None, Refuse(copy.deepcopy(teacher_model))):
        got = RecoveryLoss(student, teacher, ce=1.0, kd=0.0, feature=0.0, chunk_tokens=5)(ids, labels)
        assert torch.equal(got, ref)


def test_recovery_loss_kd_only_matches_kl_of_the_models_own_logits(pair):
    student, teacher_model, ids, labels = pair
    loss = RecoveryLoss(student, Teacher(copy.deepcopy(teacher_model)), ce=0.0, kd=1.0, temperature=2.0, chunk_tokens=4)
    got = loss(ids, labels)
    with torch.no_grad():
        want = kd_reference(student(ids).logits, teacher_model(ids).logits, labels, 2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert set(loss.last) == {"kd"}


def test_recovery_loss_feature_only_is_n_targets_times_squarehead(pair):
    student, teacher_model, ids, labels = pair
    got = RecoveryLoss(student, Teacher(copy.deepcopy(teacher_model)), ce=0.0, feature=1.0)(ids, labels)

    def layer_outputs(model):  # layer 0 = hidden_states[1]; the last layer = the final norm's input
        last = []
        h = model.model.norm.register_forward_pre_hook(lambda m, args: last.append(args[0]))
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states
        h.remove()
        return [states[1], last[0]]

    s, t = layer_outputs(student), layer_outputs(teacher_model)
    squarehead = sum(((a - b) ** 2).sum() / (b**2).sum() for a, b in zip(s, t)) / 2
    n_targets = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got, squarehead * n_targets, rtol=1e-5, atol=1e-6)


def test_recovery_loss_combines_terms_and_never_touches_the_teacher(pair):
    student, teacher_model, ids, labels = pair
    student = copy.deepcopy(student)
    teacher = Teacher(copy.deepcopy(teacher_model))
    frozen = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    loss = RecoveryLoss(student, teacher, ce=0.5, kd=2.0, feature=3.0, temperature=1.5, chunk_tokens=7)
    assert all(not n.startswith("teacher") for n, _ in loss.named_parameters())  # not a submodule (DDP, saves)
    loss.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(2):
        total = loss(ids, labels)
        (total / 20).backward()
        opt.step()
        opt.zero_grad()
    parts = loss.last
    torch.testing.assert_close(total.detach(), 0.5 * parts["ce"] + 2.0 * parts["kd"] + 3.0 * parts["feature"])
    assert not teacher.model.training
    for n, p in teacher.model.named_parameters():
        assert p.grad is None and not p.requires_grad and torch.equal(p, frozen[n]), n


def test_recovery_loss_gradient_same_with_activation_checkpointing(pair):
    student, teacher_model, ids, labels = pair
    grads = []
    for ckpt in (False, True):
        model = copy.deepcopy(student).train()
        if ckpt:
            activation_checkpointing(model)
        RecoveryLoss(model, Teacher(copy.deepcopy(teacher_model)), ce=1.0, kd=1.0, feature=1.0, chunk_tokens=6)(
            ids, labels
        ).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_recovery_loss_rejects_bad_weights(pair):
    student = pair[0]
    with pytest.raises(ValueError):
        RecoveryLoss(student, None, ce=1.0, kd=1.0)
    with pytest.raises(ValueError):
        RecoveryLoss(student, None, ce=0.0)
