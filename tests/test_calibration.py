"""Calibration statistics (Fisher sums, input covariance) and EoRA's projection, vs direct references."""

import pytest
import torch

from slimtune.adapters.eora import eora_lowrank
from slimtune.adapters.lq_lora import lowrank
from slimtune.calibration import calibration_samples, fisher_sums, input_covariance
from slimtune.data import Blocks


@pytest.fixture(scope="module")
def tiny():
    from slimtune.formats.hf import load_model

    torch.manual_seed(0)
    model = load_model("tiny-llama").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (6, 16), generator=g)
    return model, Blocks(ids, ids.clone())


def test_calibration_samples_are_distinct_single_blocks(tiny):
    _, blocks = tiny
    s = calibration_samples(blocks, 4, seed=1)
    assert len(s) == 4 and all(x.shape == (1, 16) and pos is None for x, _, pos in s)
    assert len({tuple(x[0].tolist()) for x, _, _ in s}) == 4
    assert len(calibration_samples(blocks, 100)) == 6


def test_fisher_sums_match_per_sample_squared_grads_of_hf_loss(tiny):
    model, blocks = tiny
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    samples = calibration_samples(blocks, 3)
    got = fisher_sums(model, names, samples, chunk_tokens=8)
    ref = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    for x, y, _ in samples:  # reference: transformers' own mean-token loss, full logits
        model.zero_grad()
        for p in model.parameters():
            p.requires_grad_(True)
        model(input_ids=x, labels=y).loss.backward()
        for n in names:
            ref[n] += model.get_submodule(n).weight.grad.square() / len(samples)
    for n in names:
        torch.testing.assert_close(got[n][0], ref[n].sum(1), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(got[n][1], ref[n].sum(0), rtol=1e-4, atol=1e-12)
    assert not any(p.grad is not None and p.requires_grad is False for p in model.parameters())


def test_input_covariance_is_xtx_of_the_layer_input(tiny):
    model, blocks = tiny
    samples = calibration_samples(blocks, 2)
    cov = input_covariance(model, ["model.layers.0.self_attn.q_proj"], samples)
    ref = 0
    for x, _, _ in samples:
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(x)).reshape(-1, model.config.hidden_size)
        ref = ref + h.T @ h
    torch.testing.assert_close(cov["model.layers.0.self_attn.q_proj"], ref.detach(), rtol=1e-4, atol=1e-4)


def test_eora_minimises_the_output_error():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(30, 20, generator=g, dtype=torch.float64)
    X = torch.randn(200, 20, generator=g, dtype=torch.float64) * torch.linspace(0.05, 3, 20, dtype=torch.float64)
    cov = X.T @ X
    L1, L2 = eora_lowrank(E, cov, 5, damp=0.0)
    out_err = ((E - (L1 @ L2).double()) @ X.T).square().sum()
    # reference optimum via a different route: Cholesky factor C = R R^T, tail singular values of E R
    R = torch.linalg.cholesky(cov)
    tail = torch.linalg.svdvals(E @ R)[5:].square().sum()
    assert float(out_err) == pytest.approx(float(tail), rel=1e-4)
    P1, P2 = lowrank(E.float(), 5, exact=True)  # the plain SVD is worse on the activations
    assert float(((E - (P1 @ P2).double()) @ X.T).square().sum()) > float(out_err)


def test_samples_see_packed_documents_and_padding_as_training_does(tiny):
    """A packed block (two documents, positions restarting) gives the statistics of its documents run alone
    (no attention across them), and a padded row (data.packing=none) those of its real tokens: Fisher sums
    and input covariance of a layer that sees attention output (o_proj, down_proj)."""
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 500, (9,), generator=g), torch.randint(0, 500, (7,), generator=g)
    packed = Blocks(
        torch.cat([a, b])[None], torch.cat([a, b])[None], torch.cat([torch.arange(9), torch.arange(7)])[None]
    )
    padded = Blocks(
        torch.cat([a, torch.zeros(7, dtype=torch.long)])[None],
        torch.cat([a, torch.full((7,), -100)])[None],
        torch.cat([torch.arange(9), torch.full((7,), -1)])[None],
    )
    alone = [(d[None], d[None].clone(), None) for d in (a, b)]
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    ((x, _, pos),) = calibration_samples(padded, 1)
    assert x.shape == (1, 9) and torch.equal(pos, torch.arange(9)[None])  # cut to its tokens
    cov = input_covariance(model, names, calibration_samples(packed, 1))
    want = input_covariance(model, names, alone)
    for n in names:
        torch.testing.assert_close(cov[n], want[n], rtol=1e-4, atol=1e-4)
    cov_pad = input_covariance(model, names, calibration_samples(padded, 1))
    want_pad = input_covariance(model, names, alone[:1])
    for n in names:
        torch.testing.assert_close(cov_pad[n], want_pad[n], rtol=1e-4, atol=1e-4)
