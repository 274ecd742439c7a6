"""PASER-like recovery data selection after pruning (`data.select=degradation`, `data.select_fraction`).

PASER ("Post-training data selection for efficient pruned LLM recovery") spends the recovery budget on
the samples whose capability the pruning damaged most, spread over the semantic regions of the data:

1. `score_blocks`: one dense and one pruned forward per batch give each block's degradation (pruned minus
   dense mean token loss, or mean per-token KL(dense || pruned)) and its dense embedding (mean final
   hidden state over the block's tokens).
2. `kmeans` clusters the embeddings; `select_blocks` gives each cluster a share of the budget in
   proportion to its total degradation and takes its most degraded blocks.
`random_blocks` is the same-size baseline.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.data import Blocks
from slimtune.errors import SlimtuneError
from slimtune.registry import OPTIONS
from slimtune.technique import Technique
from slimtune.lm_loss import IGNORE, lm_loss_sum, logit_transform, position_kwargs

MEASURES = ("loss", "kl")


@contextmanager
def _eval_mode(*models: nn.Module):
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (B, T, H) of the decoder, without the head; position_ids as data.packing made them
    (restarting per document: no attention across documents; -1: padding, masked), as in training."""
    dev = _device(model)
    kwargs = {k: v.to(dev) for k, v in position_kwargs(position_ids).items()}
    return model.get_decoder()(input_ids=input_ids.to(dev), use_cache=False, **kwargs).last_hidden_state


def _mean_tokens(hidden: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, H) fp32 on CPU: the mean hidden state over each row's tokens (padding excluded)."""
    h = hidden.float().cpu()
    if position_ids is None:
        return h.mean(dim=1)
    real = (position_ids >= 0).float()[..., None]
    return (h * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


def _rows(blocks: Blocks, s: int, n: int):
    return blocks.rows(slice(s, s + n))


def _row_losses(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token CE of each row (B,) fp32 on CPU; 0 for a row without targets."""
    head, transform = model.get_output_embeddings(), logit_transform(model.config)
    labels = labels.to(hidden.device)
    out = torch.zeros(hidden.shape[0], dtype=torch.float32)
    for i in range(hidden.shape[0]):
        n = int((labels[i, 1:] != IGNORE).sum())
        if n:
            out[i] = float(lm_loss_sum(hidden[i : i + 1], head, labels[i : i + 1], chunk_tokens, transform)) / n
    return out


def _row_kl(
    dense: nn.Module,
    pruned: nn.Module,
    h_dense: torch.Tensor,
    h_pruned: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """Mean over target positions of KL(dense || pruned) per row (B,) fp32 on CPU.

    Only (chunk_tokens, V) fp32 logits of each model exist at a time (chunk_tokens <= 0: all at once)."""
    dev = h_dense.device
    B, T, H = h_dense.shape
    y = labels[:, 1:].to(dev)
    keep = (y != IGNORE).reshape(-1)
    rows = torch.arange(B, device=dev).repeat_interleave(T - 1)[keep]
    hd = h_dense[:, :-1].reshape(-1, H)[keep]
    hp = h_pruned[:, :-1].reshape(-1, H)[keep.to(h_pruned.device)]
    head_d, head_p = dense.get_output_embeddings(), pruned.get_output_embeddings()
    t_d, t_p = logit_transform(dense.config), logit_transform(pruned.config)
    kl_sum = torch.zeros(B, dtype=torch.float32, device=dev)
    step = chunk_tokens if chunk_tokens > 0 else max(hd.shape[0], 1)
    for s in range(0, hd.shape[0], step):
        logp_d = F.log_softmax(t_d(head_d(hd[s : s + step])).float(), dim=-1)
        logp_p = F.log_softmax(t_p(head_p(hp[s : s + step])).float().to(dev), dim=-1)
        kl = (logp_d.exp() * (logp_d - logp_p)).sum(-1)
        kl_sum.index_add_(0, rows[s : s + step], kl)
    n = (y != IGNORE).sum(1).clamp(min=1)
    return (kl_sum / n).cpu()


@torch.no_grad()
def score_blocks(
    dense: nn.Module,
    pruned: nn.Module,
    blocks: Blocks,
    batch_size: int = 4,
    chunk_tokens: int = 256,
    measure: str = "loss",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(degradation (N,), dense embeddings (N, H)), both fp32 on CPU, from one dense and one pruned decoder
    pass per batch (eval mode, no grad; the models' train/eval flags are restored).

    measure="loss": pruned minus dense mean token loss of each block; "kl": mean over the block's target
    positions of KL(dense || pruned) of the next-token distributions. A block without targets scores 0.
    Embedding: the dense model's final hidden state averaged over the block's tokens (padding excluded).
    Both models see the blocks as training does: position ids restarting per packed document, padding masked.
    """
    if measure not in MEASURES:
        raise SlimtuneError(f"measure={measure!r}: use one of {', '.join(MEASURES)}")
    scores, embeddings = [], []
    with _eval_mode(dense, pruned):
        for s in range(0, len(blocks), batch_size):
            x, y, pos = _rows(blocks, s, batch_size)
            h_d, h_p = _hidden(dense, x, pos), _hidden(pruned, x, pos)
            embeddings.append(_mean_tokens(h_d, pos))
            if measure == "loss":
                scores.append(_row_losses(pruned, h_p, y, chunk_tokens) - _row_losses(dense, h_d, y, chunk_tokens))
            else:
                scores.append(_row_kl(dense, pruned, h_d, h_p, y, chunk_tokens))
    return torch.cat(scores), torch.cat(embeddings)


def degradation_scores(
    dense: nn.Module,
    pruned: nn.Module,
    blocks: Blocks,
    batch_size: int = 4,
    chunk_tokens: int = 256,
    measure: str = "loss",
) -> torch.Tensor:
    """Per-block degradation (N,) fp32; see `score_blocks`."""
    return score_blocks(dense, pruned, blocks, batch_size, chunk_tokens, measure)[0]


@torch.no_grad()
def dense_embeddings(dense: nn.Module, blocks: Blocks, batch_size: int = 4) -> torch.Tensor:
    """(N, H) fp32: the dense model's mean final hidden state over each block's tokens."""
    out = []
    with _eval_mode(dense):
        for s in range(0, len(blocks), batch_size):
            x, _, pos = _rows(blocks, s, batch_size)
            out.append(_mean_tokens(_hidden(dense, x, pos), pos))
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the rows of x (N, D): (labels (N,) int64, centroids (k, D) fp32), deterministic.

    Init: k-means++ (first centre uniform, then each with probability proportional to the squared distance
    to the nearest chosen centre; uniform over unchosen points if all distances are 0) from a
    torch.Generator seeded with `seed`. An empty cluster is re-seeded at the point farthest from its
    centre. Stops when the assignment no longer changes, or after `iters` updates.
    """
    x = x.detach().float().cpu()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise SlimtuneError(f"kmeans: k={k} must be between 1 and the number of points ({n})")
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    d2 = torch.cdist(x, x[chosen]).square().min(dim=1).values
    while len(chosen) < k:
        w = d2.clone()
        if float(w.sum()) <= 0:
            w = torch.ones(n)
        w[chosen] = 0
        chosen.append(int(torch.multinomial(w, 1, generator=g)))
        d2 = torch.minimum(d2, (x - x[chosen[-1]]).square().sum(dim=1))
    centroids = x[chosen].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centroids).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).float()
        dist = (x - centroids[labels]).square().sum(dim=1)
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = int(dist.argmax())
            centroids[c] = x[far]
            dist[far] = -1.0  # the next empty cluster takes another point
    return labels, centroids


def budget_size(n: int, fraction: float) -> int:
    """B = max(1, round(fraction * n)) (Python round), at most n."""
    if not 0 < fraction <= 1:
        raise SlimtuneError(f"data.select_fraction={fraction}: must be in (0, 1]")
    return min(n, max(1, round(fraction * n)))


def allocate(weights: torch.Tensor, sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Integer budgets (k,) summing to `total` (<= sizes.sum()), proportional to weights, each <= its size.

    Repeat: quotas q_c = remaining * w_c / sum(w) over the clusters not yet full (sizes as weights if
    those weights sum to 0); a cluster with q_c >= size_c is filled and the rest re-divided. Then each
    gets floor(q_c), and the leftover goes one each by largest remainder (ties: lower cluster index).
    """
    if not 0 <= total <= int(sizes.sum()):
        raise SlimtuneError(f"allocate: total={total} must be between 0 and the number of blocks ({int(sizes.sum())})")
    k = len(sizes)
    budgets = torch.zeros(k, dtype=torch.long)
    active = torch.ones(k, dtype=torch.bool)
    remaining = total
    while remaining > 0:
        w = torch.where(active, weights.double().clamp(min=0), torch.zeros((), dtype=torch.float64))
        if float(w.sum()) <= 0:
            w = torch.where(active, sizes.double(), torch.zeros((), dtype=torch.float64))
        q = remaining * w / w.sum()
        full = active & (q >= sizes.double())
        if full.any():
            budgets[full] = sizes[full]
            active &= ~full
            remaining = total - int(budgets.sum())
            continue
        floors = q.floor().long()
        budgets += floors
        left = remaining - int(floors.sum())
        order = sorted(range(k), key=lambda c: (-(float(q[c]) - int(floors[c])), c))
        for c in [c for c in order if active[c] and budgets[c] < sizes[c]][:left]:
            budgets[c] += 1
        break
    return budgets


def select_blocks(
    scores: torch.Tensor, embeddings: torch.Tensor, fraction: float, k: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Indices (sorted, int64) of the B = max(1, round(fraction * N)) blocks to recover on.

    Rule: cluster the blocks with `kmeans(embeddings, k, seed=seed)`, k = round(sqrt(N / 2)) by default,
    clamped to [1, N]. Cluster c's budget is proportional to its degradation, the sum of its positive
    scores (to its size if no score is positive), allocated by `allocate`: largest-remainder rounding so
    the budgets sum to exactly B, a cluster that would exceed its size filled and its overflow shared out
    among the others. Each cluster contributes its `budget` highest-scoring blocks (ties: lower index).
    """
    return _select(scores, embeddings, fraction, k, seed)[0]


def _select(scores, embeddings, fraction, k, seed) -> tuple[torch.Tensor, int]:
    scores = scores.detach().float().cpu()
    n = scores.shape[0]
    total = budget_size(n, fraction)
    k = min(max(round(math.sqrt(n / 2)) if k is None else k, 1), n)
    labels, _ = kmeans(embeddings, k, seed=seed)
    sizes = torch.bincount(labels, minlength=k)
    weights = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, scores.double().clamp(min=0))
    budgets = allocate(weights, sizes, total)
    picked = []
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        order = torch.sort(-scores[members], stable=True).indices
        picked.append(members[order[: int(budgets[c])]])
    return torch.cat(picked).sort().values, k


def random_blocks(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """The baseline: B = max(1, round(fraction * n)) indices drawn uniformly without replacement, sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: budget_size(n, fraction)].sort().values


def select_recovery_data(
    dense: nn.Module,
    pruned: nn.Module,
    blocks: Blocks,
    fraction: float,
    seed: int = 0,
    k: int | None = None,
    batch_size: int = 4,
    chunk_tokens: int = 256,
    measure: str = "loss",
) -> tuple[Blocks, dict]:
    """(the selected blocks as a new Blocks, summary) for recovery fine-tuning of `pruned`.

    summary: n_candidates, n_selected, clusters, measure, mean_score_selected, mean_score_all."""
    if len(blocks) == 0:
        raise SlimtuneError("recovery data selection: no candidate blocks")
    scores, emb = score_blocks(dense, pruned, blocks, batch_size, chunk_tokens, measure)
    idx, clusters = _select(scores, emb, fraction, k, seed)
    summary = {
        "n_candidates": len(blocks),
        "n_selected": len(idx),
        "clusters": clusters,
        "measure": measure,
        "mean_score_selected": float(scores[idx].mean()),
        "mean_score_all": float(scores.mean()),
    }
    return blocks.subset(idx), summary


@OPTIONS.register("data.select")
class DataSelection(Technique):
    """data.select=degradation | random: recovery data chosen among the training blocks."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.data.select != "all"

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"streamable"}
