"""PASER-like recovery data selection: degradation scores vs transformers' own loss / a by-hand KL, k-means on
separated blobs, the budget rule on hand-computed examples, the random baseline."""

import copy

import pytest
import torch
import torch.nn.functional as F

from slimtune.prune.select import (
    allocate,
    degradation_scores,
    dense_embeddings,
    kmeans,
    random_blocks,
    score_blocks,
    select_blocks,
    select_recovery_data,
)
from slimtune.data import Blocks

IGNORE = -100


@pytest.fixture(scope="module")
def models_and_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    dense = LlamaForCausalLM(cfg).eval()
    pruned = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) >= 0.5).float())  # half zeroed
    ids = torch.randint(0, 128, (5, 12), generator=g)
    labels = ids.clone()
    labels[1, :5] = IGNORE  # a prompt/response block
    labels[3, :9] = IGNORE
    return dense, pruned, Blocks(ids, labels)


def _hf_losses(model, blocks):
    with torch.no_grad():
        return torch.stack(
            [
                model(input_ids=blocks.input_ids[i : i + 1], labels=blocks.labels[i : i + 1]).loss
                for i in range(len(blocks))
            ]
        )


def test_loss_scores_match_transformers_loss(models_and_blocks):
    dense, pruned, blocks = models_and_blocks
    want = _hf_losses(pruned, blocks) - _hf_losses(dense, blocks)
    got = degradation_scores(dense, pruned, blocks, batch_size=2, chunk_tokens=3)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.abs().min() > 1e-3  # the pruning did change something


def test_kl_scores_match_by_hand(models_and_blocks):
    dense, pruned, blocks = models_and_blocks
    with torch.no_grad():
        logp_d = F.log_softmax(dense(input_ids=blocks.input_ids).logits.float(), -1)[:, :-1]
        logp_p = F.log_softmax(pruned(input_ids=blocks.input_ids).logits.float(), -1)[:, :-1]
    kl = (logp_d.exp() * (logp_d - logp_p)).sum(-1)  # (N, T-1)
    mask = blocks.labels[:, 1:] != IGNORE
    want = (kl * mask).sum(1) / mask.sum(1)
    for chunk in (3, 0):
        got = degradation_scores(dense, pruned, blocks, batch_size=2, chunk_tokens=chunk, measure="kl")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want > 0).all()


def test_identical_models_score_zero(models_and_blocks):
    dense, _, blocks = models_and_blocks
    twin = copy.deepcopy(dense)
    for measure in ("loss", "kl"):
        torch.testing.assert_close(
            degradation_scores(dense, twin, blocks, measure=measure), torch.zeros(5), atol=1e-6, rtol=0
        )


def test_embeddings_are_mean_final_hidden_states(models_and_blocks):
    dense, pruned, blocks = models_and_blocks
    with torch.no_grad():
        want = dense.model(input_ids=blocks.input_ids).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(dense_embeddings(dense, blocks, batch_size=3), want)
    dense.train()
    scores, emb = score_blocks(dense, pruned, blocks, batch_size=4)
    assert dense.training and not pruned.training  # flags restored
    dense.eval()
    torch.testing.assert_close(emb, want)
    assert scores.shape == (5,)


def _blobs(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, 0]])[: len(sizes)]
    x = torch.cat([c + 0.1 * torch.randn(n, 3, generator=g) for c, n in zip(centres, sizes)])
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(x), generator=g)
    return x[perm], truth[perm]


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_blobs_and_is_deterministic():
    x, truth = _blobs([7, 5, 9, 4])
    for seed in range(5):
        labels, centroids = kmeans(x, 4, seed=seed)
        assert _same_partition(labels, truth)
        assert centroids.shape == (4, 3)
        again = kmeans(x, 4, seed=seed)
        assert torch.equal(labels, again[0]) and torch.equal(centroids, again[1])
    assert kmeans(x, 1)[0].eq(0).all()
    assert len(set(kmeans(x, len(x))[0].tolist())) == len(x)  # k = N: one point per cluster
    with pytest.raises(Exception, match="k=0"):
        kmeans(x, 0)


def test_allocate_rules():
    # quotas 3, 1.8, 1.2 -> floors 3, 1, 1, the leftover to the largest remainder
    assert allocate(torch.tensor([5.0, 3.0, 2.0]), torch.tensor([4, 4, 4]), 6).tolist() == [3, 2, 1]
    # cluster 0 overflows (quota 5 > size 2): filled, the other 4 split evenly
    assert allocate(torch.tensor([10.0, 1.0, 1.0]), torch.tensor([2, 5, 5]), 6).tolist() == [2, 2, 2]
    # the only weighted cluster is full: the rest by size
    assert allocate(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1, 2, 6]), 5).tolist() == [1, 1, 3]
    # tie on remainders (0.5, 0.5): lower index first
    assert allocate(torch.tensor([1.0, 1.0]), torch.tensor([3, 3]), 3).tolist() == [2, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(1, 8, (1,), generator=g))
        sizes = torch.randint(0, 10, (k,), generator=g)
        w = torch.rand(k, generator=g) * (torch.rand(k, generator=g) > 0.3)
        total = int(torch.randint(0, int(sizes.sum()) + 1, (1,), generator=g))
        b = allocate(w, sizes, total)
        assert int(b.sum()) == total and (b <= sizes).all() and (b >= 0).all()


def _three_clusters():
    scores_by_cluster = [[2.5, 1.5, 1.0, -1.0], [2.0, 1.0, -0.5, -2.0], [1.5, 0.5, -3.0, -1.0]]  # positive sums 5, 3, 2
    x, truth = _blobs([4, 4, 4], seed=3)
    scores = torch.empty(12)
    for c in range(3):
        scores[truth == c] = torch.tensor(scores_by_cluster[c])
    return scores, x, truth


def test_select_blocks_proportional_to_cluster_degradation():
    scores, x, truth = _three_clusters()
    idx = select_blocks(scores, x, fraction=0.5, k=3)
    assert torch.equal(idx, idx.sort().values) and len(idx) == 6  # B = round(0.5 * 12)
    assert [int((truth[idx] == c).sum()) for c in range(3)] == [3, 2, 1]  # quotas 3, 1.8, 1.2
    assert sorted(scores[idx].tolist()) == sorted([2.5, 1.5, 1.0, 2.0, 1.0, 1.5])  # the top of each cluster
    # default k = round(sqrt(12 / 2)) = 2: still B blocks
    assert len(select_blocks(scores, x, fraction=0.5)) == 6


def test_select_blocks_overflow_all_negative_and_full():
    x, truth = _blobs([2, 5, 5], seed=4)
    scores = torch.zeros(12)
    scores[truth == 0] = 5.0
    scores[truth == 1] = torch.tensor([0.5, 0.5, 0.0, 0.0, -1.0])
    scores[truth == 2] = torch.tensor([1.0, 0.0, -2.0, -2.0, -2.0])
    idx = select_blocks(scores, x, fraction=0.5, k=3)
    assert [int((truth[idx] == c).sum()) for c in range(3)] == [2, 2, 2]  # cluster 0 capped at its size
    assert sorted(scores[idx].tolist()) == [0.0, 0.5, 0.5, 1.0, 5.0, 5.0]
    neg = -torch.rand(12, generator=torch.Generator().manual_seed(0)) - 0.1
    idx = select_blocks(neg, x, fraction=0.5, k=3)  # all <= 0: by size, 2:5:5 of 6 -> 1, 2.5, 2.5 -> 1, 3, 2
    assert [int((truth[idx] == c).sum()) for c in range(3)] in ([1, 3, 2], [1, 2, 3])
    assert torch.equal(select_blocks(scores, x, fraction=1.0, k=3), torch.arange(12))
    assert len(select_blocks(scores, x, fraction=0.01)) == 1
    with pytest.raises(Exception, match="select_fraction"):
        select_blocks(scores, x, fraction=0.0)


def test_random_blocks_same_size_and_seeded():
    a = random_blocks(100, 0.25, seed=1)
    assert len(a) == 25 and len(set(a.tolist())) == 25 and torch.equal(a, a.sort().values)
    assert torch.equal(a, random_blocks(100, 0.25, seed=1))
    assert not torch.equal(a, random_blocks(100, 0.25, seed=2))
    assert len(random_blocks(3, 0.01)) == 1 and torch.equal(random_blocks(7, 1.0), torch.arange(7))


def test_select_recovery_data(models_and_blocks):
    dense, pruned, blocks = models_and_blocks
    subset, summary = select_recovery_data(dense, pruned, blocks, fraction=0.6, seed=0, k=2)
    scores = degradation_scores(dense, pruned, blocks)
    assert len(subset) == 3 and summary["n_candidates"] == 5 and summary["n_selected"] == 3
    assert summary["clusters"] == 2
    rows = [next(i for i in range(5) if torch.equal(blocks.input_ids[i], r)) for r in subset.input_ids]
    assert rows == sorted(rows) and torch.equal(subset.labels, blocks.labels[rows])
    assert summary["mean_score_selected"] == pytest.approx(float(scores[rows].mean()), abs=1e-6)
    assert summary["mean_score_all"] == pytest.approx(float(scores.mean()), abs=1e-6)


def test_scores_see_packed_documents_and_padding_as_training_does(models_and_blocks):
    """Blocks with position ids (data.packing=documents: two documents in a row; none: padded rows) are scored
    as each document / real token run alone: the same degradation and embedding as the document scored in
    its own unpacked row (no attention across documents, padding masked)."""
    dense, pruned, _ = models_and_blocks
    g = torch.Generator().manual_seed(5)
    doc_a, doc_b = torch.randint(0, 128, (7,), generator=g), torch.randint(0, 128, (5,), generator=g)
    packed = Blocks(
        torch.cat([doc_a, doc_b])[None],
        torch.cat([torch.tensor([IGNORE]), doc_a[1:], torch.tensor([IGNORE]), doc_b[1:]])[None],
        torch.cat([torch.arange(7), torch.arange(5)])[None],
    )
    alone = [Blocks(d[None], d[None].clone()) for d in (doc_a, doc_b)]
    s_packed, _ = score_blocks(dense, pruned, packed, measure="loss")
    per_doc = [score_blocks(dense, pruned, b, measure="loss")[0] for b in alone]
    # the packed row's mean loss weights each document by its 6 / 4 targets
    want = torch.stack([_hf_losses(pruned, b) - _hf_losses(dense, b) for b in alone]).squeeze(1)
    torch.testing.assert_close(torch.cat(per_doc), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_packed, (6 * want[0] + 4 * want[1])[None] / 10, atol=1e-5, rtol=0)
    pad = Blocks(
        torch.cat([doc_a, torch.zeros(5, dtype=torch.long)])[None],
        torch.cat([doc_a, torch.full((5,), IGNORE)])[None],
        torch.cat([torch.arange(7), torch.full((5,), -1)])[None],
    )
    for measure in ("loss", "kl"):
        s_pad, e_pad = score_blocks(dense, pruned, pad, measure=measure)
        s_alone, e_alone = score_blocks(dense, pruned, alone[0], measure=measure)
        torch.testing.assert_close(s_pad, s_alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(e_pad, e_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        dense_embeddings(dense, pad), score_blocks(dense, pruned, alone[0])[1], atol=1e-5, rtol=0
    )
