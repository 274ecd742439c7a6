"""Recovery runs on a `slimtune prune` output: masks held through steps, kill -9 + resume, export, LoRA and
QLoRA recovery (merged model stays sparse), torchrun, distillation from the dense source, data selection,
CrAM, and the one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli import main
from slimtune.compress.prune_model import MANIFEST
from slimtune_testutil import (
    TINY,
    free_port,
    killer_script,
    run_cli,
    safetensors_dir as _weights,
    losses as _losses,
)

RUN = [*TINY, "train.max_steps=6", "train.lr=3e-3", "train.warmup_steps=1"]




def _zeros(d):
    """module name -> weight == 0 of every matrix the manifest lists."""
    w = _weights(d)
    return {n: w[f"{n}.weight"] == 0 for n in json.loads((d / MANIFEST).read_text())["matrices"]}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """tiny-llama trained 20 steps (a teacher worth distilling), then Wanda 50% (the dense dir in the manifest)."""
    root = tmp_path_factory.mktemp("pruned")
    assert main(["run", "full", *TINY, "train.max_steps=20", "train.lr=3e-3", f"output_dir={root / 'dense'}"]) == 0
    assert main(["prune", *TINY, f"model.name={root / 'dense' / 'final'}", "prune.method=wanda",
                 "prune.calibration_samples=8", f"output_dir={root / 'w50'}"]) == 0
    return root / "w50"


_cli = run_cli


def test_full_recovery_keeps_masks_and_distills(pruned, tmp_path):
    before = _zeros(pruned)
    out = tmp_path / "rec"
    assert main(["run", "recover", *RUN, f"model.name={pruned}", f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_perplexity"] < report["eval_perplexity_before"]
    after = _weights(out / "final")
    for name, zero in before.items():
        w = after[f"{name}.weight"]
        assert torch.all(w[zero] == 0), name  # pruned entries exactly 0
        assert not torch.equal(w, _weights(pruned)[f"{name}.weight"]), name  # kept ones trained
    manifest = json.loads((out / "final" / MANIFEST).read_text())
    assert manifest["method"] == "wanda" and all(s >= 0.5 for s in manifest["matrices"].values())
    assert main(["eval", f"model.name={out / 'final'}", *TINY]) == 0  # the recovered dir loads and scores


KILLER = killer_script("recover", 4)  # mid-step, after the step-4 checkpoint


def test_kill_then_resume_is_bitwise_and_masks_are_checked(pruned, tmp_path):
    args = [*RUN, f"model.name={pruned}", "checkpoint.every=2", "train.max_grad_norm=0.5"]
    ref = tmp_path / "ref"
    _cli("-m", "slimtune", "run", "recover", *args, f"output_dir={ref}")
    b = tmp_path / "b"
    assert _cli("-c", KILLER, *args, f"output_dir={b}", check=False).returncode == -9
    masks = load_file(str(b / "checkpoints" / "step_4" / "masks.safetensors"))
    assert len(masks) == len(_zeros(pruned)) and all(m.dtype == torch.uint8 for m in masks.values())
    _cli("-m", "slimtune", "run", "recover", *args, f"output_dir={b}", "resume=true")
    assert _losses(b) == _losses(ref)
    wa, wb = _weights(ref / "final"), _weights(b / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_base_whose_zeros_changed(pruned, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(pruned, base)
    args = [*RUN, f"model.name={base}", "checkpoint.every=2", "train.max_steps=4"]
    out = tmp_path / "r"
    _cli("-m", "slimtune", "run", "recover", *args, "train.max_steps=2", f"output_dir={out}", "checkpoint.every=1")
    f = next(base.glob("*.safetensors"))
    w = load_file(str(f))
    name = next(k for k in w if k.endswith("q_proj.weight"))
    w[name] = torch.where(w[name] == 0, torch.ones_like(w[name]), w[name])  # the zeros are gone
    from safetensors.torch import save_file

    save_file(w, str(f), metadata={"format": "pt"})
    r = _cli("-m", "slimtune", "run", "recover", *args, f"output_dir={out}", "resume=true", check=False)
    assert r.returncode == 2 and "masks differ" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_lora_recovery_merges_sparse(pruned, tmp_path, quant):
    out = tmp_path / "lora"
    assert main(["run", "recover", *RUN, f"model.name={pruned}", "adapter.type=lora", "adapter.rank=4",
                 f"quant.method={quant}", "train.lr=1e-2", f"output_dir={out}"]) == 0
    assert main(["export", str(out), "--merge"]) == 0
    merged = _weights(out / "merged")
    zeros = _zeros(pruned)
    for name, zero in zeros.items():
        assert torch.all(merged[f"{name}.weight"][zero] == 0), name
    assert any(not torch.equal(merged[f"{n}.weight"], _weights(pruned)[f"{n}.weight"]) for n in zeros)
    assert (out / "merged" / MANIFEST).is_file()
    if quant == "none":  # the merged model computes what the adapter on its masked base computes
        from transformers import AutoModelForCausalLM

        from slimtune.config import load_config
        from slimtune.trainer.pipeline import build_for_eval

        ids = torch.randint(0, 100, (1, 16))
        with torch.no_grad():
            a = build_for_eval(load_config(None, [*TINY, f"model.name={out / 'final'}"]))(ids).logits
            b = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
        assert torch.allclose(a, b, atol=1e-4)


def test_torchrun_recovery_holds_masks(pruned, tmp_path):
    out = tmp_path / "ddp"
    r = _cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
             str(free_port()), "-m", "slimtune", "run", "recover", *RUN, f"model.name={pruned}", "train.batch_size=2",
             f"output_dir={out}")
    assert r.returncode == 0
    after = _weights(out / "final")
    assert all(torch.all(after[f"{n}.weight"][z] == 0) for n, z in _zeros(pruned).items())


@pytest.mark.parametrize("select", ["degradation", "random"])
def test_data_selection_trains_on_a_fraction(pruned, tmp_path, select):
    out = tmp_path / select
    assert main(["run", "recover", *RUN, f"model.name={pruned}", f"data.select={select}",
                 "data.select_fraction=0.5", f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    full = json.loads((pruned.parent / "dense" / "report.json").read_text())["train_blocks"]
    assert report["train_blocks"] == round(0.5 * full)


def test_cram_trains_a_dense_model(tmp_path):
    out = tmp_path / "cram"
    assert main(["run", "full", *RUN, "optim.cram=true", "cram.rho=0.01", "train.max_steps=10",
                 f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_perplexity"] < report["eval_perplexity_before"]
    assert report["final_loss"] < report["initial_loss"]


@pytest.mark.parametrize("override, needle", [
    (["model.name=tiny-llama", "recover.kd=1"], "set recover.teacher=MODEL"),
    (["model.name=tiny-llama", "recover.kd=0", "recover.feature=0", "data.select=degradation"], "recover.teacher"),
    (["recover.ce=0", "recover.kd=0", "recover.feature=0"], "give at least one a weight"),
    (["prune.sparsity=1.5"], "prune.sparsity=1.5 must be in (0, 1)"),
    (["optim.cram=true", "optim.in_backward=true"], "optim.cram=true needs the whole gradient"),
])
def test_bad_recovery_settings_are_one_line(override, needle, tmp_path, capsys):
    assert main(["run", "full", *RUN, *override, f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_a_decomposition_that_densifies_a_pruned_base_is_refused(pruned, tmp_path, capsys):
    """LQ-LoRA quantizes W - L1 L2, which is not 0 where W was pruned: the run would silently train a dense
    model, so it is one line pointing at what keeps it sparse."""
    assert main(["run", "lq_lora", *RUN, f"model.name={pruned}", "adapter.rank=4", "lq_lora.calibration_samples=2",
                 f"output_dir={tmp_path / 'lq'}"]) == 2
    err = capsys.readouterr().err
    assert "makes its pruned weights nonzero" in err and err.count("\n") == 1, err


def test_lowrank_factors_of_a_sparse_nf4_export_train_on(pruned, tmp_path):
    """export --format sparse-nf4 --rank R, then `run lora` on it trains those factors (LQ-LoRA's recipe on
    the kept weights) and the update stays masked."""
    out = tmp_path / "snf4"
    assert main(["export", str(pruned), "--format", "sparse-nf4", "--rank", "4", "--out", str(out)]) == 0
    run = tmp_path / "run"
    assert main(["run", "lora", *RUN, f"model.name={out}", "train.lr=1e-2", f"output_dir={run}"]) == 0
    curve = _losses(run)
    assert curve[-1] < curve[0]
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    start = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == start.keys()  # the export's factors, trained (not a fresh adapter)
    assert any(not torch.equal(adapter[k].float(), start[k].float()) for k in adapter)
    from slimtune.config import load_config
    from slimtune.trainer.pipeline import build_for_eval
    from slimtune.adapters import adapter_modules

    model = build_for_eval(load_config(None, [*TINY, f"model.name={run / 'final'}"]))
    zeros = _zeros(pruned)
    for name, m in adapter_modules(model).items():
        eff = m.base.weight.float() + m.delta_weight()
        assert torch.all(eff[zeros[name]] == 0), name
