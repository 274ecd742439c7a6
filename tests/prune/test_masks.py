"""Fixed sparsity masks (prune/masks.py): pruned weights stay exactly 0 through AdamW training."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.prune.masks import MaskedParams, merge_masked
from slimtune.lm_loss import CausalLMLoss, count_targets


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).float()


def random_masks(model, density: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) < density
        for n, p in model.named_parameters()
        if p.dim() == 2 and ".layers." in n
    }


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (4, 16), generator=g)
    return ids, ids.clone()


def pruned_entries(model, masks):
    params = dict(model.named_parameters())
    return {n: params[n].detach()[~m] for n, m in masks.items()}


@pytest.mark.parametrize("post_step_apply", [True, False])
def test_adamw_training_keeps_pruned_weights_exactly_zero(post_step_apply):
    model = tiny_llama()
    masks = random_masks(model)
    masked = MaskedParams(model, masks).attach()
    assert all((v == 0).all() for v in pruned_entries(model, masks).values())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    if post_step_apply:
        masked.wrap_optimizer(opt)
    # without the post-step apply(), the masked gradients alone keep Adam's moments (so the update) at 0
    loss_model, (x, y) = CausalLMLoss(model, chunk_tokens=0), batch()
    losses = []
    for _ in range(5):
        loss = loss_model(x, y) / count_targets(y)
        loss.backward()
        for n, m in masks.items():
            assert (dict(model.named_parameters())[n].grad[~m] == 0).all(), n
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        for n, v in pruned_entries(model, masks).items():
            assert (v == 0).all(), n
    assert losses[-1] < losses[0]
    kept = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert (kept.detach()[masks["model.layers.0.mlp.up_proj.weight"]] != 0).all()
    assert pytest.approx(list(masked.sparsity().values())[0], abs=0.05) == 0.5


def test_apply_restores_zeros_and_wrap_optimizer_clears_stale_moments():
    model = tiny_llama()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch()
    CausalLMLoss(model, 0)(x, y).backward()  # a dense step first: moments nonzero everywhere
    opt.step()
    opt.zero_grad()
    masked = MaskedParams(model, masks).attach()
    masked.wrap_optimizer(opt)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt.state[params[n]][key][~m] == 0).all()
    with torch.no_grad():
        for n in masks:
            params[n].add_(1.0)  # someone writes into pruned entries
    masked.apply()
    assert all((v == 0).all() for v in pruned_entries(model, masks).values())
    masked.detach()
    assert all(not params[n]._backward_hooks for n in masks)


def test_state_dict_round_trip_and_load_into_attached():
    model = tiny_llama()
    a = MaskedParams(model, random_masks(model, seed=0)).attach()
    state = a.state_dict()
    assert all(t.dtype == torch.uint8 and t.device.type == "cpu" for t in state.values())
    other = random_masks(model, seed=5)
    b = MaskedParams(model, other)
    b.load_state_dict(state)
    assert all(torch.equal(b.masks[n], a.masks[n]) for n in state)
    a.load_state_dict({n: m.to(torch.uint8) for n, m in other.items()})  # attached: enforced now
    assert all((v == 0).all() for v in pruned_entries(model, other).values())
    with pytest.raises(KeyError):
        b.load_state_dict({"model.layers.0.mlp.up_proj.weight": state["model.layers.0.mlp.up_proj.weight"]})
    with pytest.raises(TypeError):
        MaskedParams(model, {n: m.float() for n, m in other.items()})


def test_from_zeros_reads_the_pruned_model():
    model = tiny_llama()
    masks = random_masks(model)
    MaskedParams(model, masks).apply()
    found = MaskedParams.from_zeros(model, list(masks))
    assert all(torch.equal(found.masks[n], masks[n]) for n in masks)


def test_merge_masked_keeps_the_base_sparsity():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 8, generator=g) < 0.5
    base = (torch.randn(6, 8, generator=g) * mask).to(torch.bfloat16)
    delta = torch.randn(6, 8, generator=g)
    delta[0, 0] = float("nan") if not mask[0, 0] else delta[0, 0]  # a pruned entry's delta never leaks
    merged = merge_masked(base, delta, mask)
    assert merged.dtype == torch.bfloat16
    assert (merged[~mask] == 0).all()
    want = (base.float() + delta * mask).to(torch.bfloat16)
    assert torch.equal(merged[mask], want[mask])
    with pytest.raises(ValueError):
        merge_masked(base, delta[:, :4], mask)
