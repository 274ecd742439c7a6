"""QAT runs (quant/qat.py): the `qat` and `qat_lora` recipes train against fake quantization and final/ is the
real quantized checkpoint whose logits equal the last step's fake-quantized logits bit for bit (fp32,
weight-only and with int8 activations); qat.start_step; distillation from the model before fake quantization;
kill -9 + resume bitwise; refusals in one line."""

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.config import load_config
from slimtune.hooks import Hooks
from slimtune.model.pipeline import build_for_eval
from slimtune.quant.activations import fake_quantize_activations
from slimtune.quant.fake import FakeQuantLinear
from slimtune.trainer import run
from slimtune_testutil import TINY, assert_kill_resume_bitwise, losses

RUN = [*TINY, "train.max_steps=4", "train.lr=1e-3", "train.warmup_steps=1", "checkpoint.every=0"]
TOKENS = torch.arange(3, 3 + 2 * 48).remainder(200).view(2, 48)


class LastLogits(Hooks):
    """The model's logits on TOKENS after the last step (eval mode, as final/ is scored)."""

    def __init__(self, max_steps: int):
        self.max_steps, self.logits, self.fake = max_steps, None, {}

    def after_step(self, model, optimizer, step):
        if step == self.max_steps:
            self.fake = {n: m.enabled for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
            was = model.training
            model.eval()
            with torch.no_grad():
                self.logits = model(TOKENS).logits.float()
            model.train(was)


def _run(recipe, out, *overrides) -> LastLogits:
    cfg = load_config(recipe, [*RUN, f"output_dir={out}", *overrides])
    hook = LastLogits(cfg.train.max_steps)
    run(cfg, hooks=[hook])
    return hook


def _final_logits(out) -> torch.Tensor:
    cfg = load_config("qat", [*TINY, f"model.name={out / 'final'}"])
    with torch.no_grad():
        return build_for_eval(cfg)(TOKENS).logits.float()


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("qat", ["qat.method=int4"]),
        ("qat", ["qat.method=nf3", "quant.double_quant=false", "qat.activations=int8"]),
        ("qat_lora", ["qat.method=nf4"]),
        ("qat_lora", ["qat.method=int3a", "qat.activations=int8", "lora.rank=4"]),
        ("qat", ["qat.method=int3a", "qat.learn_scales=true"]),
        ("qat", ["qat.method=nf3", "qat.pv_tuning=true", "qat.pv_fraction=0.05"]),
        ("qat_lora", ["qat.method=nf3", "qat.learn_scales=true", "quant.double_quant=false"]),
    ],
)
def test_final_is_the_quantized_model_the_last_step_computed(recipe, overrides, tmp_path):
    out = tmp_path / "run"
    hook = _run(recipe, out, *overrides)
    assert hook.fake and all(hook.fake.values())  # every linear but lm_head fake-quantized
    assert not any(n.endswith("lm_head") for n in hook.fake)
    manifest = json.loads((out / "final" / "slimtune_quant.json").read_text())
    method = next(o.split("=")[1] for o in overrides if o.startswith("qat.method="))
    assert manifest["method"] == method and manifest["qat"]["method"] == method
    assert set(manifest["quantized"]) == {n.removesuffix(".base") for n in hook.fake}
    assert manifest["adapters"] == {}  # LoRA merged before quantizing
    acts = "int8" if "qat.activations=int8" in overrides else None
    assert all(spec.get("activations") == acts for spec in manifest["quantized"].values())
    assert torch.equal(_final_logits(out), hook.logits)
    report = json.loads((out / "report.json").read_text())
    assert report["eval_perplexity"] < report["eval_perplexity_before"]  # against the fake-quantized start


def test_qat_lora_trains_only_the_adapter_against_the_merged_quantization(tmp_path):
    """The base stays frozen and full precision; the gradient reaches B through fake_quantize(W + s B A)."""
    from slimtune.adapters.lora import LoRALinear

    cfg = load_config("qat_lora", [*RUN, "qat.method=int4", f"output_dir={tmp_path}"])
    from slimtune.model.pipeline import build_model

    built = build_model(cfg, torch.device("cpu"))
    model = built.model
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert lora and all(isinstance(m.base, FakeQuantLinear) and m.delta_in_base for m in lora)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    with torch.no_grad():
        for m in lora:
            m.lora_B.weight.normal_(0, 0.05)
    model(TOKENS, labels=TOKENS).loss.backward()
    m = lora[0]
    # d loss / d delta is d loss / d W_eff (straight through): B's gradient is (dW_eff) A^T * scaling
    w = m.base.weight.detach().clone().requires_grad_(False)
    assert m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0
    assert torch.equal(m.base.weight, w)


def test_start_step_trains_plain_then_fake_quantized(tmp_path):
    plain = tmp_path / "plain"
    assert main(["run", "full", *RUN, f"output_dir={plain}"]) == 0
    late = tmp_path / "late"
    hook = _run("qat", late, "qat.start_step=2")
    assert all(hook.fake.values())
    a, b = losses(plain), losses(late)
    assert a[:2] == b[:2] and a[2:] != b[2:]  # steps 1-2 as plain full fine-tuning, then quantized
    assert torch.equal(_final_logits(late), hook.logits)


def test_per_token_int8_activations():
    """Each row lands on a 256-level grid through 0 (0 is exact), within half a step of its value, and the
    gradient passes straight through."""
    torch.manual_seed(0)
    x = torch.randn(6, 40) * torch.tensor([0.01, 1, 3, 100, 1, 1])[:, None]
    x[4] = x[4].abs() + 0.5  # all positive: the range still includes 0
    x[5, :] = 0
    y = fake_quantize_activations(x)
    for row, q in zip(x, y):
        lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        step = max((hi - lo) / 255, torch.finfo(torch.float32).eps)
        assert (q - row).abs().max() <= step / 2 * (1 + 1e-5) + 1e-12
        levels = torch.unique(q)
        assert len(levels) <= 256
        ratios = levels / step
        assert torch.allclose(ratios, ratios.round(), atol=1e-3)
    assert torch.equal(y[5], x[5])
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    (fake_quantize_activations(xr) * g).sum().backward()
    assert torch.equal(xr.grad, g)


def test_distillation_teacher_is_the_model_before_fake_quantization(tmp_path, capsys):
    """KD alone (recover.ce=0): with fake quantization still off at step 1 the student is its teacher (KL 0);
    from step 2 the fake-quantized student differs, and training brings it back towards the teacher."""
    out = tmp_path / "kd"
    _run("qat", out, "recover.ce=0", "recover.kd=1.0", "qat.start_step=1", "qat.method=nf2", "train.max_steps=8")
    assert "recover: teacher tiny-llama" in capsys.readouterr().out
    curve = losses(out)
    assert curve[0] == 0 and curve[1] > 1e-3, curve
    assert sum(curve[-3:]) / 3 < curve[1], curve
    assert (out / "final" / "slimtune_quant.json").is_file()


def test_pv_tuning_changes_a_bounded_number_of_codes_per_step(tmp_path):
    """Each step at most ceil(pv_fraction * numel) codes of a matrix change, some do change, and the scales and
    the straight-through buffers train (the P step)."""
    from slimtune.quant.packing import unpack_bits

    class Codes(Hooks):
        def __init__(self):
            self.changes, self.moved, self.prev = [], set(), None

        def _state(self, model):
            return {
                n: (
                    unpack_bits(m.qat_codes, 3, m.weight.numel()),
                    m.qat_scale.detach().clone(),
                    m.weight.detach().clone(),
                )
                for n, m in model.named_modules()
                if isinstance(m, FakeQuantLinear)
            }

        def on_setup(self, model, optimizer, cfg):
            self.prev = self._state(model)

        def after_backward(self, model, step):  # the previous step's hooks (the V step) have all run
            now = self._state(model)
            for n, (codes, s, w) in now.items():
                codes0, s0, w0 = self.prev[n]
                self.moved |= {"scale"} if not torch.equal(s, s0) else set()
                self.moved |= {"buffer"} if not torch.equal(w, w0) else set()
                self.changes.append((int((codes != codes0).sum()), w.numel()))
            self.prev = now

    cfg = load_config(
        "qat",
        [
            *RUN,
            "qat.method=int3",
            "qat.pv_tuning=true",
            "qat.pv_fraction=0.02",
            "quant.double_quant=false",
            f"output_dir={tmp_path}",
        ],
    )
    hook = Codes()
    run(cfg, hooks=[hook])
    assert all(n <= -(-2 * total // 100) for n, total in hook.changes), hook.changes
    assert sum(n for n, _ in hook.changes) > 0 and hook.moved == {"scale", "buffer"}


@pytest.mark.parametrize("extra", [["qat.method=nf3"], ["qat.method=int2a", "qat.pv_tuning=true"]])
def test_kill_then_resume_is_bitwise(extra, tmp_path):
    args = [*RUN, "checkpoint.every=2", *extra, "optim.state_bits=8", "train.max_grad_norm=0.5"]
    assert_kill_resume_bitwise("qat", args, tmp_path)  # killed mid-step 4, after the step-2 checkpoint


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["engine.name=offload", "qat.learn_scales=true"],
            "qat.learn_scales=true starts each block's scale from its weights, which engine.params=disk keeps",
        ),
        (
            ["adapter.type=lora", "quant.method=nf4"],
            "qat.method=int4 needs full-precision linear layers in the base, which quant.method=nf4",
        ),
        (
            ["train.precision=fp8"],
            "train.precision=fp8 needs full-precision linear layers in the base, which qat.method",
        ),
        (["adapter.type=dora"], "qat.method=int4 trains full fine-tuning or LoRA, not adapter.type=dora"),
        (["adapter.type=lora", "lora.dropout=0.1"], "leaves no input for lora.dropout=0.1"),
        (["qat.start_step=4"], "qat.start_step=4 must be in [0, train.max_steps=4)"),
        (["qat.method=lq_lora"], "qat.method='lq_lora' is not a quantized format"),
        (["qat.method=int5", "quant.block_size=7"], "needs numel divisible by block_size=7"),
        (["qat.activations=fp8"], "qat.activations"),
        (["qat.method=nf4", "qat.learn_scales=true"], "qat.learn_scales=true needs a format that stores plain block"),
        (["qat.method=int4", "qat.pv_tuning=true"], "qat.pv_tuning=true is for codes of at most 3 bits"),
        (["qat.method=none", "qat.pv_tuning=true"], "not qat.method=none"),  # it would do nothing: refused
        (["qat.method=nf3", "qat.pv_tuning=true", "engine.name=fsdp2"], "not with engine.name=fsdp2"),
        (["qat.method=nf3", "qat.pv_tuning=true", "adapter.type=lora"], "not with adapter.type=lora"),
    ],
)
def test_what_qat_cannot_do_is_one_line(overrides, needle, tmp_path, capsys):
    assert main(["run", "qat", *RUN, *overrides, f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
