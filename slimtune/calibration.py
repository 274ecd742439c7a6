"""Calibration statistics of a model's linear layers, from a few training blocks.

* `fisher_sums`: diagonal empirical Fisher F = mean over samples of (dL/dW)^2, per sample (batch 1,
  LQ-LoRA's estimate), reduced at once to its row and column sums: LQ-LoRA weights the decomposition
  by the rank-1 approximation F ~ r c^T / sum(F), so only (out,) + (in,) values per matrix are kept.
* `input_covariance`: X^T X of each layer's inputs (EoRA's activation statistics), (in, in) fp32.
`Calibration` binds the samples, so a technique below this layer (adapters/lq_lora, adapters/eora) asks
for the statistic it needs without importing up.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.data import Blocks
from slimtune.lm_loss import CausalLMLoss, count_targets, position_kwargs


def calibration_samples(blocks: Blocks, n: int, seed: int = 0) -> list[tuple]:
    """n (input_ids, labels, position_ids or None) of shape (1, T), drawn without replacement (seeded) from
    `blocks`, as training sees them: position ids restarting at each packed document (data.packing=documents:
    no attention across documents), a padded row (data.packing=none) cut to its tokens."""
    idx = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[: min(n, len(blocks))]
    out = []
    for i in idx.sort().values.tolist():
        x, y, pos = blocks.rows(slice(i, i + 1))
        if pos is not None:
            n_real = int((pos >= 0).sum())
            x, y, pos = x[:, :n_real], y[:, :n_real], pos[:, :n_real]
        out.append((x, y, pos))
    return out


def sample_inputs(sample) -> tuple[torch.Tensor, dict]:
    """(input_ids (B, T), the decoder's position kwargs) of a calibration sample: input_ids, or a tuple
    (input_ids, labels[, position_ids])."""
    if not isinstance(sample, (tuple, list)):
        return (sample if sample.dim() == 2 else sample.unsqueeze(0)), {}
    pos = sample[2] if len(sample) > 2 else None
    return sample[0], position_kwargs(pos)


def fisher_sums(
    model: nn.Module, names: list[str], samples, chunk_tokens: int = 256
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (row sums (out,), col sums (in,)) of the diagonal Fisher of that linear's weight (fp32).

    Gradients are taken of each sample's mean token loss; only the listed weights get gradients, the
    others are frozen for the duration and restored afterwards.
    """
    weights = {n: model.get_submodule(n).weight for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    acc = {n: torch.zeros(w.shape, dtype=torch.float32) for n, w in weights.items()}
    loss_model, was_training = CausalLMLoss(model, chunk_tokens), model.training
    model.eval()  # no dropout: the Fisher of the model as it will be used
    try:
        for x, y, *pos in samples:
            with torch.enable_grad():
                loss = loss_model(x, y, *pos) / max(count_targets(y), 1)
                grads = torch.autograd.grad(loss, list(weights.values()))
            for n, g in zip(weights, grads):
                acc[n].add_(g.float().square())
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    k = max(len(samples), 1)
    return {n: ((f / k).sum(dim=1), (f / k).sum(dim=0)) for n, f in acc.items()}


@torch.no_grad()
def input_covariance(model: nn.Module, names: list[str], samples) -> dict[str, torch.Tensor]:
    """name -> sum over calibration tokens of x x^T for that linear's input x: (in, in) fp32."""
    cov: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            cov[name] = cov[name] + x.T @ x if name in cov else x.T @ x

        return fn

    for n in names:
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    was_training = model.training
    model.eval()
    try:
        decoder = model.get_decoder()
        for sample in samples:
            x, kwargs = sample_inputs(sample)
            decoder(input_ids=x, use_cache=False, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return cov


class Calibration:
    """Calibration samples + the statistics computed from them, for LQ-LoRA / LoftQ / EoRA."""

    def __init__(self, samples, chunk_tokens: int = 256):
        self.samples, self.chunk_tokens = samples, chunk_tokens

    def fisher_sums(self, model: nn.Module, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return fisher_sums(model, names, self.samples, self.chunk_tokens)

    def input_covariance(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        return input_covariance(model, names, self.samples)
