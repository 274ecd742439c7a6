"""Combinations on a pruned or compressed base that used to crash: sparse fine-tuning of a pruned base (its
deltas stay on kept entries, at selection and at regrowth, and the merged model stays sparse), full
recovery with the optimizer in backward, and eval with model.keep_compressed=true of a quantized base."""

import json

import pytest
import torch

from slimtune.adapters.sparse_ft import SparseFTLinear
from slimtune.cli import main
from slimtune.formats.pruned import MANIFEST
from slimtune_testutil import TINY, safetensors_dir

RUN = [*TINY, "train.max_steps=4", "train.lr=3e-3", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "w50"
    assert main(["prune", *TINY, "model.name=tiny-llama", "prune.calibration_samples=4", f"output_dir={out}"]) == 0
    return out


def _zeros(d) -> dict[str, torch.Tensor]:
    w = safetensors_dir(d)
    return {n: w[f"{n}.weight"] == 0 for n in json.loads((d / MANIFEST).read_text())["matrices"]}


def test_sparse_ft_deltas_stay_on_kept_entries_at_selection_and_regrowth():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16, bias=False)
    keep = torch.rand(16, 32) > 0.5
    m = SparseFTLinear(base, density=0.2, seed=3)
    assert not keep.view(-1)[m.indices].all()  # the random draw hits pruned entries before the mask
    m.set_weight_mask(keep)
    k = m.num_params
    assert keep.view(-1)[m.indices].all() and torch.equal(m.indices, m.indices.sort().values)
    with torch.no_grad():
        m.deltas.copy_(torch.linspace(-1, 1, k))
    scores = torch.where(keep, torch.rand(16, 32), 100.0 + torch.rand(16, 32))  # pruned entries score highest
    for fn in (lambda: scores, lambda: lambda r0, r1: scores[r0:r1]):  # a dense tensor and score blocks
        m.reselect(k // 2, fn())
        assert keep.view(-1)[m.indices].all() and m.num_params == k
    dense = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        dense.weight.mul_(keep)  # a pruned weight
    m2 = SparseFTLinear(dense, density=0.2, seed=3)
    m2.set_weight_mask(keep)
    with torch.no_grad():
        m2.deltas.fill_(0.5)
    m2.merge()
    assert torch.all(dense.weight[~keep] == 0)  # merged: still sparse


def test_a_trained_sparse_ft_adapter_off_the_mask_is_refused():
    m = SparseFTLinear(torch.nn.Linear(8, 8, bias=False), density=0.5, seed=0)
    with torch.no_grad():
        m.deltas.fill_(1.0)
    with pytest.raises(ValueError, match="pruned weights"):
        m.set_weight_mask(torch.zeros(8, 8, dtype=torch.bool))


def test_sparse_ft_on_a_pruned_base_trains_and_merges_sparse(pruned, tmp_path):
    out = tmp_path / "sft"
    assert (
        main(
            [
                "run",
                "sparse_ft",
                *RUN,
                f"model.name={pruned}",
                "sparse_ft.reselect_every=2",
                "sparse_ft.accumulate_steps=1",
                "sparse_ft.drop_fraction=0.5",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    assert main(["export", str(out), "--merge"]) == 0
    merged, base, zeros = safetensors_dir(out / "merged"), safetensors_dir(pruned), _zeros(pruned)
    for name, zero in zeros.items():
        assert torch.all(merged[f"{name}.weight"][zero] == 0), name
    assert any(not torch.equal(merged[f"{n}.weight"], base[f"{n}.weight"]) for n in zeros)


def test_full_recovery_with_the_optimizer_in_backward(pruned, tmp_path):
    """optim.in_backward=true steps each weight in backward; the masks' post-step guard runs at the loop's step
    and the run equals the ordinary one (AdamW per parameter = AdamW), pruned entries exactly 0."""
    runs = {}
    for in_backward in (False, True):
        out = tmp_path / f"ib{in_backward}"
        assert (
            main(
                [
                    "run",
                    "recover",
                    *RUN,
                    f"model.name={pruned}",
                    "train.max_grad_norm=0",
                    "recover.kd=0",
                    "recover.feature=0",
                    f"optim.in_backward={str(in_backward).lower()}",
                    f"output_dir={out}",
                ]
            )
            == 0
        )
        runs[in_backward] = safetensors_dir(out / "final")
    for name, zero in _zeros(pruned).items():
        w = runs[True][f"{name}.weight"]
        assert torch.all(w[zero] == 0) and not torch.equal(w, safetensors_dir(pruned)[f"{name}.weight"]), name
    for key, w in runs[False].items():
        torch.testing.assert_close(runs[True][key], w, rtol=1e-5, atol=1e-6)


def _eval(capsys, *args) -> float:
    capsys.readouterr()
    assert main(["eval", *TINY, *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_perplexity"]


@pytest.mark.parametrize("fmt", ["dfloat11", "sparse-nf4"])
def test_keep_compressed_with_a_quantized_base_evaluates_as_decoded(pruned, tmp_path, capsys, fmt):
    """keep_compressed=true with quant.method, and an adapter trained (QLoRA) on a compressed base: the base is
    decoded once and quantized, so the perplexity equals the one without keep_compressed."""
    export = tmp_path / fmt
    assert main(["export", str(pruned), "--format", fmt, "--out", str(export)]) == 0
    kept = _eval(capsys, f"model.name={export}", "model.keep_compressed=true", "quant.method=nf4")
    assert kept == _eval(capsys, f"model.name={export}", "quant.method=nf4")
    run = tmp_path / "qlora"
    assert main(["run", "qlora", *RUN, "train.max_steps=2", f"model.name={export}", f"output_dir={run}"]) == 0
    kept = _eval(capsys, f"model.name={run / 'final'}", "model.keep_compressed=true")
    assert kept == _eval(capsys, f"model.name={run / 'final'}")


def test_export_merge_merges_the_adapter_before_quantizing(pruned, tmp_path):
    """`export RUN --format sparse-nf4`: the adapter stays beside the quantized values; with --merge it is merged
    first, exactly as exporting the merged HF model (`export RUN --merge`) would."""
    from slimtune.formats.compressed_io import load_compressed

    run = tmp_path / "lora"
    assert (
        main(
            [
                "run",
                "recover",
                *RUN,
                "train.max_steps=2",
                f"model.name={pruned}",
                "adapter.type=lora",
                "lora.rank=4",
                "recover.kd=0",
                "recover.feature=0",
                f"output_dir={run}",
            ]
        )
        == 0
    )
    beside, merged, ref = tmp_path / "beside", tmp_path / "merged", tmp_path / "ref"
    assert main(["export", str(run), "--format", "sparse-nf4", "--out", str(beside)]) == 0
    assert main(["export", str(run), "--format", "sparse-nf4", "--merge", "--out", str(merged)]) == 0
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "hf"), "--format", "sparse-nf4", "--out", str(ref)]) == 0
    assert (beside / "adapter").is_dir() and not (merged / "adapter").exists()
    got, want = load_compressed(merged).state_dict(), load_compressed(ref).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
