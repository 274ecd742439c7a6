"""Recovery runs on a `slimtune prune` output: masks held through steps, kill -9 + resume, export, LoRA and
QLoRA recovery (merged model stays sparse), torchrun, distillation from the dense source, data selection,
CrAM, and the one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from slimtune.cli import main
from slimtune.formats.pruned import MANIFEST
from slimtune.hooks import Hooks
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
    assert (
        main(
            [
                "prune",
                *TINY,
                f"model.name={root / 'dense' / 'final'}",
                "prune.method=wanda",
                "prune.calibration_samples=8",
                f"output_dir={root / 'w50'}",
            ]
        )
        == 0
    )
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
    from slimtune.formats.pruned import write_sparse_record

    write_sparse_record(base, json.loads((base / MANIFEST).read_text()))  # a consistent dir, as if pruned again
    r = _cli("-m", "slimtune", "run", "recover", *args, f"output_dir={out}", "resume=true", check=False)
    assert r.returncode == 2 and "masks differ" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_lora_recovery_merges_sparse(pruned, tmp_path, quant):
    out = tmp_path / "lora"
    assert (
        main(
            [
                "run",
                "recover",
                *RUN,
                f"model.name={pruned}",
                "adapter.type=lora",
                "lora.rank=4",
                f"quant.method={quant}",
                "train.lr=1e-2",
                f"output_dir={out}",
            ]
        )
        == 0
    )
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
        from slimtune.model.pipeline import build_for_eval

        ids = torch.randint(0, 100, (1, 16))
        with torch.no_grad():
            a = build_for_eval(load_config(None, [*TINY, f"model.name={out / 'final'}"]))(ids).logits
            b = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
        assert torch.allclose(a, b, atol=1e-4)


def test_torchrun_recovery_holds_masks(pruned, tmp_path):
    out = tmp_path / "ddp"
    r = _cli(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "slimtune",
        "run",
        "recover",
        *RUN,
        f"model.name={pruned}",
        "train.batch_size=2",
        f"output_dir={out}",
    )
    assert r.returncode == 0
    after = _weights(out / "final")
    assert all(torch.all(after[f"{n}.weight"][z] == 0) for n, z in _zeros(pruned).items())


@pytest.mark.parametrize("select", ["degradation", "random"])
def test_data_selection_trains_on_a_fraction(pruned, tmp_path, select):
    out = tmp_path / select
    assert (
        main(
            [
                "run",
                "recover",
                *RUN,
                f"model.name={pruned}",
                f"data.select={select}",
                "data.select_fraction=0.5",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    full = json.loads((pruned.parent / "dense" / "report.json").read_text())["train_blocks"]
    assert report["train_blocks"] == round(0.5 * full)


class _StepZero(Hooks):
    """What the loop hands on at step 0: the weights and gradient after backward (what clipping and the
    optimizer see), then the weights after the step."""

    def after_backward(self, model, step):
        if step == 0:
            self.w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def after_step(self, model, optimizer, step):
        if step == 1:
            self.w1 = {n: p.detach().clone() for n, p in model.named_parameters()}


def _topk_keep(w, sparsity):
    """C's mask, written here: the round((1 - s) numel) largest |w| of the tensor."""
    k = w.numel() - round(sparsity * w.numel())
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[w.abs().flatten().argsort(descending=True)[:k]] = True
    return keep.view_as(w)


def _cram_plus_grad(x, y, rho, sparsity):
    """CrAM+ (Peste et al. 2023) on the global batch, by autograd on a model loaded here from the same file:
    g = grad L(w); w~ = C(w + rho g); g~ = mask(w~) * grad L(w~); returns g~ + g by name."""
    from slimtune.formats.hf import load_model

    model = load_model("tiny-llama", "float32").train()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    g = dict(zip(params, torch.autograd.grad(model(input_ids=x, labels=y).loss, list(params.values()))))
    keep = {}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(rho * g[n])
            if p.dim() >= 2:
                keep[n] = _topk_keep(p, sparsity)
                p.mul_(keep[n])
    g_tilde = torch.autograd.grad(model(input_ids=x, labels=y).loss, list(params.values()))
    return {n: (gt * keep[n] if n in keep else gt) + g[n] for n, gt in zip(params, g_tilde)}


def test_cram_trains_a_dense_model(tmp_path, monkeypatch):
    """The loop's CrAM wiring against the formula: step 0's gradient is CrAM+'s g~ + g (computed here on the
    same batch), taken at the restored weights w, and the optimizer steps with it; the run then trains."""
    from slimtune.config import load_config
    from slimtune.formats.hf import load_model
    from slimtune.trainer import loop

    batches, real_micro_batch = [], loop.micro_batch

    def recorded(*args, **kwargs):  # the loop's batches, as it draws them
        batches.append(real_micro_batch(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(loop, "micro_batch", recorded)
    rho, sparsity = 0.05, 0.5
    probe = _StepZero()
    cfg = load_config(
        "full",
        [
            *RUN,
            "optim.cram=true",
            f"cram.rho={rho}",
            f"cram.sparsities=[{sparsity}]",
            "train.max_steps=10",
            "train.grad_accum=2",
            "data.packing=stream",
            f"output_dir={tmp_path / 'cram'}",
        ],
    )
    report = loop.run(cfg, hooks=[probe])
    # the global batch of step 0 (two micro-batches; stream packing: no position ids)
    assert all(pos is None for _, _, pos in batches[:2])
    x, y = torch.cat([b[0] for b in batches[:2]]), torch.cat([b[1] for b in batches[:2]])
    want = _cram_plus_grad(x, y, rho, sparsity)
    start = dict(load_model("tiny-llama", "float32").named_parameters())
    assert probe.grad.keys() == want.keys()
    for n, g in want.items():
        torch.testing.assert_close(probe.w0[n], start[n].detach(), rtol=0, atol=0)  # restored to w
        torch.testing.assert_close(probe.grad[n], g, rtol=1e-4, atol=1e-7)
    # the step: torch's AdamW on the clipped g~ + g the hook saw
    ref = {n: torch.nn.Parameter(w.clone()) for n, w in probe.w0.items()}
    for n, p in ref.items():
        p.grad = probe.grad[n].clone()
    torch.nn.utils.clip_grad_norm_(list(ref.values()), cfg.train.max_grad_norm)
    torch.optim.AdamW(
        list(ref.values()),
        lr=loop.lr_at(0, cfg.train),
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    ).step()
    for n, p in ref.items():
        torch.testing.assert_close(probe.w1[n], p.detach(), rtol=1e-5, atol=1e-8)
    assert report["eval_perplexity"] < report["eval_perplexity_before"]
    assert report["final_loss"] < report["initial_loss"]


@pytest.mark.parametrize(
    "override, needle",
    [
        (["model.name=tiny-llama", "recover.kd=1"], "set recover.teacher=MODEL"),
        (["model.name=tiny-llama", "recover.kd=0", "recover.feature=0", "data.select=degradation"], "recover.teacher"),
        (["recover.ce=0", "recover.kd=0", "recover.feature=0"], "give at least one a weight"),
        (["prune.sparsity=1.5"], "prune.sparsity=1.5 must be in (0, 1)"),
        (
            ["optim.cram=true", "optim.in_backward=true"],
            "optim.cram=true needs every gradient in memory before the optimizer step, which optim.in_backward=true",
        ),
    ],
)
def test_bad_recovery_settings_are_one_line(override, needle, tmp_path, capsys):
    assert main(["run", "full", *RUN, *override, f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_a_decomposition_that_densifies_a_pruned_base_is_refused(pruned, tmp_path, capsys):
    """LQ-LoRA quantizes W - L1 L2, which is not 0 where W was pruned: the run would silently train a dense
    model, so it is one line pointing at what keeps it sparse."""
    assert (
        main(
            [
                "run",
                "lq_lora",
                *RUN,
                f"model.name={pruned}",
                "lora.rank=4",
                "lq_lora.calibration_samples=2",
                f"output_dir={tmp_path / 'lq'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "(pruned) needs a base that keeps 0 exactly (the pruned weights stay pruned), which quant.method=lq_lora "
        "does not give"
        in err
        and err.count("\n") == 1
    ), err


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
    from slimtune.model.pipeline import build_for_eval
    from slimtune.adapters import adapter_modules

    model = build_for_eval(load_config(None, [*TINY, f"model.name={run / 'final'}"]))
    zeros = _zeros(pruned)
    for name, m in adapter_modules(model).items():
        eff = m.base.weight.float() + m.delta_weight()
        assert torch.all(eff[zeros[name]] == 0), name
