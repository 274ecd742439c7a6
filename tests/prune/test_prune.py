"""Pruning: masks against brute-force references, SparseGPT against exact least squares, and the
layer-sequential model driver + sparse checkpoint on a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import slimtune.prune.layerwise as prune_model_mod
from slimtune.prune.sparsegpt import exact_obs_prune, sparsegpt_prune
from slimtune.prune.magnitude import magnitude_mask
from slimtune.prune.patterns import parse_pattern, pattern_name
from slimtune.prune.wanda import wanda_mask
from slimtune.formats.pruned import load_masks, save_sparse
from slimtune.prune.layerwise import prunable_linears, prune_model
from slimtune.errors import SlimtuneError
from slimtune.cli import main
from slimtune_testutil import TINY
from slimtune.formats.hf import load_tokenizer


# ---- references -----------------------------------------------------------------------------------


def brute_mask(scores: torch.Tensor, sparsity: float, nm=None, scope="row") -> torch.Tensor:
    """Loop-and-argsort reference: prune the lowest scores, the lower index first on ties."""
    out_f, in_f = scores.shape
    keep = torch.ones(out_f, in_f, dtype=torch.bool)
    if scope == "layer" and nm is None:
        order = torch.argsort(scores.flatten(), stable=True).tolist()
        for flat in order[: int(sparsity * scores.numel())]:
            keep[flat // in_f, flat % in_f] = False
        return keep
    for r in range(out_f):
        if nm is None:
            for j in torch.argsort(scores[r], stable=True).tolist()[: int(sparsity * in_f)]:
                keep[r, j] = False
            continue
        n, m = nm
        for g in range(0, in_f, m):
            for j in torch.argsort(scores[r, g : g + m], stable=True).tolist()[: m - n]:
                keep[r, g + j] = False
    return keep


def correlated_inputs(tokens: int, in_f: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """X = Z A: inputs with a non-identity covariance and uneven feature scales (tokens, in)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    A = A + torch.diag(torch.rand(in_f, generator=g, dtype=torch.float64) * 3)
    return (torch.randn(tokens, in_f, generator=g, dtype=torch.float64) @ A).to(dtype)


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


# ---- patterns and masks ---------------------------------------------------------------------------


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)
    assert parse_pattern(124) == (2, 4) and parse_pattern(248) == (4, 8)  # PyYAML's base-60 2:4 / 4:8
    assert pattern_name(parse_pattern(124)) == "2:4" and pattern_name(None) == "unstructured"
    for bad in ("2:x", "4:2", "0:4", "2:4:8", "dense", 5, True, 0.5):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_magnitude_and_wanda_match_brute_force(sparsity, scope):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 40, generator=g)
    x_norm = torch.rand(40, generator=g) * 3
    assert torch.equal(magnitude_mask(W, sparsity, scope=scope), brute_mask(W.abs(), sparsity, scope=scope))
    ref = brute_mask(W.abs() * x_norm, sparsity, scope=scope)
    assert torch.equal(wanda_mask(W, x_norm, sparsity, scope=scope), ref)
    if scope == "row":  # int(sparsity * in) pruned in every row: 0.3 * 40 = 12, 0.7 * 40 = 28
        assert ((~ref).sum(dim=1) == int(sparsity * 40)).all()
    else:
        assert (~ref).sum() == int(sparsity * W.numel())


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_exact(nm):
    n, m = nm
    g = torch.Generator().manual_seed(1)
    W, x_norm = torch.randn(6, 32, generator=g), torch.rand(32, generator=g)
    for mask, scores in ((magnitude_mask(W, 0.0, nm), W.abs()), (wanda_mask(W, x_norm, 0.0, nm), W.abs() * x_norm)):
        assert torch.equal(mask, brute_mask(scores, 0.0, nm))
        assert (mask.reshape(6, 32 // m, m).sum(dim=2) == n).all()
    with pytest.raises(ValueError, match="divisible"):
        magnitude_mask(torch.randn(2, 6), 0.5, (2, 4))


def test_ties_prune_the_lower_index_first():
    mask = magnitude_mask(torch.ones(3, 8), 0.5)
    assert torch.equal(mask, torch.tensor([[False] * 4 + [True] * 4] * 3))
    assert torch.equal(magnitude_mask(torch.ones(2, 4), 0.0, (2, 4)), torch.tensor([[False, False, True, True]] * 2))


def test_wanda_with_unit_norms_is_magnitude():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    for nm, scope in ((None, "row"), (None, "layer"), ((2, 4), "row")):
        assert torch.equal(wanda_mask(W, torch.ones(64), 0.5, nm, scope), magnitude_mask(W, 0.5, nm, scope))


# ---- SparseGPT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    X = correlated_inputs(512, 64, seed=3)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))

    def error(W_new):
        return torch.linalg.norm((W - W_new) @ X.T).item()

    W_sgpt, keep = sparsegpt_prune(W, hessian(X), 0.5, nm, blocksize=16)
    assert torch.equal(W_sgpt == 0, ~keep) and ((~keep).sum(dim=1) == 32).all()
    e_sgpt = error(W_sgpt)
    e_mag = error(W * magnitude_mask(W, 0.5, nm))
    e_wanda = error(W * wanda_mask(W, X.norm(dim=0), 0.5, nm))
    assert e_sgpt < 0.9 * e_mag and e_sgpt < 0.9 * e_wanda, (e_sgpt, e_mag, e_wanda)


def test_sparsegpt_fixed_prefix_mask_is_exact_least_squares():
    """Pruned columns before all kept ones in each row: sequential OBS ends with every kept weight still
    free, so it reaches the constrained least-squares optimum exactly (any blocksize: the lazy updates
    are the same arithmetic). With pruned columns after kept ones it does not: those kept weights were
    fixed before the later pruning (see the next test)."""
    X = correlated_inputs(256, 12, seed=5, dtype=torch.float64)
    H = hessian(X)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    keep = torch.ones(5, 12, dtype=torch.bool)
    for r in range(5):
        keep[r, : r + 1] = False  # 1 pruned weight in row 0 ... 5 in row 4
    exact = exact_obs_prune(W, H, keep)
    for blocksize in (3, 5, 128):
        W_new, keep_out = sparsegpt_prune(W, H, 0.0, blocksize=blocksize, percdamp=0.0, mask=keep)
        assert W_new.dtype == torch.float64 and torch.equal(keep_out, keep)
        torch.testing.assert_close(W_new, exact, rtol=1e-9, atol=1e-9)
    # damping is the same as solving with H + percdamp * mean(diag H) * I
    W_damp, _ = sparsegpt_prune(W, H, 0.0, blocksize=4, percdamp=0.1, mask=keep)
    H_damp = H + 0.1 * H.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(W_damp, exact_obs_prune(W, H_damp, keep), rtol=1e-9, atol=1e-9)


def test_sparsegpt_any_mask_completes_each_row_optimally():
    """For any mask, the columns after a row's last pruned one are the least-squares completion given
    SparseGPT's values up to it: what OBS elimination guarantees (blocksize < in: the lazy path)."""
    X = correlated_inputs(256, 16, seed=7, dtype=torch.float64)
    H = hessian(X)
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    W_new, keep = sparsegpt_prune(W, H, 0.5, blocksize=4, percdamp=0.0)
    assert ((~keep).sum(dim=1) == 8).all()
    for r in range(6):
        last = int(torch.nonzero(~keep[r]).max())
        C, F = torch.arange(16) <= last, torch.arange(16) > last
        if not F.any():
            continue
        delta_C = W_new[r, C] - W[r, C]
        best_F = W[r, F] - torch.linalg.solve(H[F][:, F], H[F][:, C] @ delta_C)
        torch.testing.assert_close(W_new[r, F], best_F, rtol=1e-9, atol=1e-9)


def test_sparsegpt_exact_sparsity_scopes_dead_inputs_and_dtype():
    X = correlated_inputs(128, 24, seed=9)
    X[:, 5] = 0  # a dead input: H_55 = 0
    W = torch.randn(8, 24, generator=torch.Generator().manual_seed(10))
    W_row, keep = sparsegpt_prune(W, hessian(X), 0.3, blocksize=7)  # 7 does not divide 24
    assert ((~keep).sum(dim=1) == int(0.3 * 24)).all() and (W_row[:, 5] == 0).all()
    _, keep_layer = sparsegpt_prune(W, hessian(X), 0.3, blocksize=7, scope="layer")
    assert (~keep_layer).sum() == int(0.3 * W.numel())
    W_nm, keep_nm = sparsegpt_prune(W, hessian(X), 0.0, (4, 8), blocksize=12)  # used as 8
    assert (keep_nm.reshape(8, 3, 8).sum(dim=2) == 4).all() and torch.equal(W_nm == 0, ~keep_nm)
    W_bf16, keep_bf16 = sparsegpt_prune(W.bfloat16(), hessian(X), 0.5)
    assert W_bf16.dtype == torch.bfloat16 and (W_bf16[~keep_bf16] == 0).all()


# ---- the model driver ---------------------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def samples(k: int = 4, T: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 128, (1, T), generator=g) for _ in range(k)]


def test_prunable_linears():
    names = prunable_linears(tiny_llama())
    per_layer = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in per_layer]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_model_and_sparse_checkpoint(method, pattern, tmp_path, tiny_model_dir):
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    achieved = prune_model(model, samples(), method, 0.5, pattern, log=lambda *_: None)
    assert list(achieved) == prunable_linears(model)
    for name, value in achieved.items():
        W = model.get_submodule(name).weight
        assert value == pytest.approx(0.5, abs=1e-3) and value == (W == 0).float().mean().item()
        if pattern == "2:4":
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(dim=2) == 2).all()
    pruned = {f"{n}.weight" for n in achieved}
    for key, value in model.state_dict().items():  # embeddings, norms, lm_head untouched
        if key not in pruned:
            assert torch.equal(value, dense[key]), key
    if method != "sparsegpt":  # a mask method only zeroes: the kept weights are the dense ones
        for key in pruned:
            W = model.state_dict()[key]
            assert torch.equal(W[W != 0], dense[key][W != 0])

    out = tmp_path / "pruned"
    manifest = {
        "method": method,
        "pattern": 124 if pattern == "2:4" else pattern,
        "sparsity": 0.5,
        "scope": "row",
        "source_model": "tiny-random",
        "matrices": achieved,
    }
    save_sparse(model, load_tokenizer(str(tiny_model_dir)), out, manifest)
    record = json.loads((out / "slimtune_sparse.json").read_text())
    assert record["format"] == "slimtune-sparse" and record["version"] == 1 and record["pattern"] == pattern
    assert record["matrices"] == achieved and record["source_model"] == "tiny-random"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    masks = load_masks(out, loaded)
    assert list(masks) == list(achieved)
    for name, mask in masks.items():
        assert torch.equal(mask, model.get_submodule(name).weight != 0)
    assert transformers.AutoTokenizer.from_pretrained(out) is not None


def test_load_masks_names_the_missing_matrix(tmp_path):
    model = tiny_llama()
    manifest = {
        "method": "magnitude",
        "pattern": "unstructured",
        "sparsity": 0.5,
        "scope": "row",
        "source_model": "x",
        "matrices": {"model.layers.7.mlp.up_proj": 0.5},
    }
    save_sparse(model, None, tmp_path / "m", manifest)
    with pytest.raises(SlimtuneError, match=r"slimtune_sparse\.json.*model\.layers\.7\.mlp\.up_proj"):
        load_masks(tmp_path / "m", model)
    with pytest.raises(SlimtuneError, match="not found"):
        load_masks(tmp_path, model)


def test_save_sparse_failure_leaves_no_partial_dir(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    manifest = {
        "method": "magnitude",
        "pattern": "2:4",
        "sparsity": 0.5,
        "scope": "row",
        "source_model": "x",
        "matrices": {},
    }
    with pytest.raises(RuntimeError, match="disk full"):
        save_sparse(tiny_llama(), BrokenTokenizer(), tmp_path / "out", manifest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer_one_is_calibrated_on_pruned_layer_zero(method, monkeypatch):
    """Spy on the statistics; recompute layer 1's from a dense model whose layer 0 is the pruned one
    (they must match: one pass of the still-dense layer 1) and from the dense model (they must differ)."""
    recorded: list[dict[str, torch.Tensor]] = []
    real = prune_model_mod._collect_stats

    def spy(layer, names, inputs, method):
        stats = real(layer, names, inputs, method)
        recorded.append({k: v.clone() for k, v in stats.items()})
        return stats

    monkeypatch.setattr(prune_model_mod, "_collect_stats", spy)
    model, data = tiny_llama(), samples()
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, data, method, 0.5, "unstructured", log=lambda *_: None)
    assert len(recorded) == 2

    def stats_of_layer1(state_dict):
        ref = tiny_llama()
        ref.load_state_dict(state_dict)
        xs: dict[str, list[torch.Tensor]] = {}
        layer1 = ref.model.layers[1]
        handles = [
            layer1.get_submodule(n).register_forward_pre_hook(
                lambda m, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
            )
            for n in recorded[1]
        ]
        with torch.no_grad():
            for ids in data:
                ref(ids)
        for h in handles:
            h.remove()
        X = {n: torch.cat(v) for n, v in xs.items()}
        if method == "wanda":
            return {n: x.square().sum(dim=0) for n, x in X.items()}
        return {n: 2 * x.T @ x / len(data) for n, x in X.items()}  # the reference's n counts sequences

    hybrid = dict(dense_sd)
    hybrid.update({k: v for k, v in model.state_dict().items() if k.startswith("model.layers.0.")})
    expected, dense = stats_of_layer1(hybrid), stats_of_layer1(dense_sd)
    assert set(expected) == set(recorded[1]) and len(expected) == 7
    for name, stat in recorded[1].items():
        torch.testing.assert_close(stat, expected[name], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(stat, dense[name], rtol=1e-2, atol=1e-3), name


def test_calibration_sees_packed_documents_apart():
    """A packed calibration sample (two documents, positions restarting) gives each linear the inputs of its
    documents run alone: Wanda's statistics (sums over tokens) equal the two documents' summed."""
    from slimtune.prune.layerwise import _collect_stats, _layer_linears, capture_layer_inputs

    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 128, (1, 9), generator=g), torch.randint(0, 128, (1, 7), generator=g)
    packed = (torch.cat([a, b], 1), None, torch.cat([torch.arange(9), torch.arange(7)])[None])
    layer = model.model.layers[0]
    names = _layer_linears(layer)
    with torch.no_grad():
        got = _collect_stats(layer, names, capture_layer_inputs(model, [packed]), "sq_norms")
        want = _collect_stats(layer, names, capture_layer_inputs(model, [a, b]), "sq_norms")
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)


def test_prune_calibrates_on_the_runs_data_with_its_chat_template(tmp_path, capsys):
    """`slimtune prune` builds its calibration blocks as a run does: data.chat_template renders messages
    records (the tokenizer has no template of its own), data.packing and data.train_on apply."""
    import json

    chats = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
        for i in range(60)
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    args = ["prune", *TINY, f"data.source={src}", "prune.calibration_samples=2", "train.seq_len=32"]
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 2  # messages need a template
    assert "chat template" in capsys.readouterr().err
    assert main([*args, f"data.chat_template={tpl}", f"output_dir={tmp_path / 'b'}"]) == 0
