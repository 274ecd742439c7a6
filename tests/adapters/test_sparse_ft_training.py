"""sparse_ft in the trainer: reselection on schedule, bitwise kill -9 resume (mid accumulation window, both
regrowth rules), the same decisions on every rank, final/ -> eval and export --merge with the same logits,
quantized bases (nf4, int8, packed nf3)."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli import main
from slimtune_testutil import (
    TINY,
    free_port,
    killer_script,
    run_cli,
    losses as _losses,
)

SFT = [
    *TINY,
    "train.max_steps=12",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "sparse_ft.reselect_every=4",
    "sparse_ft.accumulate_steps=3",
    "sparse_ft.drop_fraction=0.5",
]


_cli = run_cli


@pytest.mark.parametrize("regrow", ["ma", "ag"])
def test_trains_reselects_and_counts_only_deltas(tmp_path, regrow):
    out = tmp_path / "s"
    assert main(["run", "sparse_ft", *SFT, f"sparse_ft.regrow={regrow}", f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_perplexity"] < report["eval_perplexity_before"]
    final = load_file(str(out / "final" / "sparse_ft.safetensors"))
    manifest = json.loads((out / "final" / "slimtune_adapter.json").read_text())
    assert manifest["format"] == "sparse_ft"
    k = sum(v["num_params"] for v in manifest["modules"].values())
    assert report["trainable_params"] == k  # the active deltas: not the base, not the index arrays
    for name, spec in manifest["modules"].items():
        assert spec["num_params"] == max(1, round(manifest["density"] * spec["out_features"] * spec["in_features"]))
        idx = final[f"{name}.indices"]
        assert torch.all(idx[1:] > idx[:-1])  # sorted, unique
    # reselections moved entries: the final sets differ from the initial random draw
    from slimtune.adapters.sparse_ft import SparseFTLinear, module_seed

    name = next(iter(manifest["modules"]))
    spec = manifest["modules"][name]
    first = SparseFTLinear(
        torch.nn.Linear(spec["in_features"], spec["out_features"]),
        num_params=spec["num_params"],
        seed=module_seed(0, name),
    ).indices
    assert not torch.equal(first, final[f"{name}.indices"])


KILLER = killer_script("sparse_ft", 6)  # mid-step, after the step-6 checkpoint


@pytest.mark.parametrize("regrow", ["ma", "ag"])
def test_kill_then_resume_is_bitwise(tmp_path, regrow):
    args = [*SFT, f"sparse_ft.regrow={regrow}", "checkpoint.every=3", "train.max_grad_norm=0.5"]
    ref = tmp_path / "ref"
    _cli("-m", "slimtune", "run", "sparse_ft", *args, f"output_dir={ref}")
    b = tmp_path / "b"
    assert _cli("-c", KILLER, *args, f"output_dir={b}", check=False).returncode == -9
    saved = load_file(str(b / "checkpoints" / "step_6" / "adapters.safetensors"))
    assert any(k.endswith(".indices") for k in saved)
    stat = "sm3_row" if regrow == "ma" else "ag_grad"
    assert any(k.endswith(stat) for k in saved)  # the window's statistics so far are part of the checkpoint
    _cli("-m", "slimtune", "run", "sparse_ft", *args, f"output_dir={b}", "resume=true")
    assert _losses(b) == _losses(ref)
    a, c = (load_file(str(d / "final" / "sparse_ft.safetensors")) for d in (ref, b))
    assert all(torch.equal(a[k], c[k]) for k in a)


DUMP = """
import sys
import torch.distributed as dist
from safetensors.torch import save_file
from slimtune.adapters.sparse_ft import SparseFTLinear
from slimtune.config import load_config
from slimtune.trainer import run
from slimtune.hooks import Hooks

class DumpIndices(Hooks):
    def after_step(self, model, optimizer, step):
        if step == 12:
            idx = {n: m.indices.clone() for n, m in model.named_modules() if isinstance(m, SparseFTLinear)}
            save_file(idx, sys.argv[1] + f"/indices.rank{dist.get_rank()}.safetensors")

run(load_config("sparse_ft", sys.argv[2:]), hooks=[DumpIndices()])
"""


def test_two_ranks_make_the_same_decisions(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    r = _cli(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--no-python",
        sys.executable,
        "-c",
        DUMP,
        str(out),
        *SFT,
        "train.batch_size=2",
        f"output_dir={out / 'run'}",
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_file(str(out / f"indices.rank{i}.safetensors")) for i in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quant", ["none", "nf4", "int8", "nf3"])
def test_final_evaluates_and_merges_with_the_same_logits(tmp_path, quant):
    out = tmp_path / quant
    extra = [f"quant.method={quant}"] + (["quant.block_size=32"] if quant == "nf3" else [])
    assert main(["run", "sparse_ft", *SFT, "train.max_steps=6", *extra, f"output_dir={out}"]) == 0
    from slimtune.config import load_config
    from slimtune.model.pipeline import build_for_eval

    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        got = build_for_eval(load_config(None, [*TINY, f"model.name={out / 'final'}"]))(ids).logits
    assert main(["eval", *TINY, f"model.name={out / 'final'}"]) == 0
    onto = "quantized" if quant != "none" else "full"
    assert main(["export", str(out), "--merge", "--onto", onto]) == 0
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
    assert torch.allclose(got, merged, atol=1e-4), (got - merged).abs().max()


def test_num_params_sets_the_density_and_bad_values_are_one_line(tmp_path, capsys):
    out = tmp_path / "n"
    assert main(["run", "sparse_ft", *SFT, "train.max_steps=2", "sparse_ft.num_params=2000", f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["trainable_params"] - 2000) <= 14  # rounded per matrix
    assert main(["run", "sparse_ft", *SFT, "sparse_ft.density=0", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "sparse_ft.density=0" in capsys.readouterr().err
    assert main(["run", "sparse_ft", *SFT, "sparse_ft.num_params=100000000", f"output_dir={tmp_path / 'y'}"]) == 2
    assert "exceeds the" in capsys.readouterr().err
