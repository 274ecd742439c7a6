"""lq_lora.pv_tuning: PV-Tuning of LQ-LoRA's quantized part Q beside its LoRA factors. Each Q becomes a PV linear
of its own per-matrix format whose codes start at Q's; training changes a bounded number of codes per step, trains
the scales and the factors; final/ is an LQ-LoRA checkpoint (new codes, factors kept apart) whose logits equal the
last step's model; kill -9 + resume is bitwise; what it cannot combine with is refused in one line."""

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.config import load_config
from slimtune.model.pipeline import build_for_eval
from slimtune.quant.fake import FakeQuantLinear
from slimtune.quant.packing import unpack_bits
from slimtune.trainer import run
from slimtune.hooks import Hooks
from slimtune_testutil import TINY, assert_kill_resume_bitwise

RUN = [*TINY, "train.max_steps=4", "lq_lora.calibration_samples=2", "lq_lora.max_iters=2", "lq_lora.score_iters=1"]
RUN += ["lq_lora.pv_tuning=true", "lq_lora.pv_fraction=0.02", "checkpoint.every=0", "lora.rank=4"]
TOKENS = torch.arange(3, 3 + 2 * 48).remainder(200).view(2, 48)


class Watch(Hooks):
    """Codes changed per step and matrix, and the model's logits on TOKENS after the last step."""

    def __init__(self, max_steps: int):
        self.max_steps, self.changes, self.prev, self.logits, self.scales_moved = max_steps, [], None, None, False

    def _state(self, model):
        out = {}
        for n, m in model.named_modules():
            if isinstance(m, FakeQuantLinear):
                out[n] = (unpack_bits(m.qat_codes, m.spec.fmt.bits, m.weight.numel()), m.qat_scale.detach().clone())
        return out

    def on_setup(self, model, optimizer, cfg):
        self.prev = self._state(model)
        self.start = {n: codes for n, (codes, _) in self.prev.items()}

    def after_backward(self, model, step):
        now = self._state(model)
        for n, (codes, scale) in now.items():
            self.changes.append((int((codes != self.prev[n][0]).sum()), codes.numel()))
            self.scales_moved |= not torch.equal(scale, self.prev[n][1])
        self.prev = now

    def after_step(self, model, optimizer, step):
        if step == self.max_steps:
            was = model.training
            model.eval()
            with torch.no_grad():
                self.logits = model(TOKENS).logits.float()
            model.train(was)


def test_pv_tunes_lq_loras_quantized_part_and_final_is_what_it_computed(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("lq_lora", [*RUN, f"output_dir={out}"])
    hook = Watch(cfg.train.max_steps)
    report = run(cfg, hooks=[hook])
    assert hook.prev and all(n <= -(-2 * total // 100) for n, total in hook.changes), hook.changes
    assert sum(n for n, _ in hook.changes) > 0 and hook.scales_moved
    manifest = json.loads((out / "final" / "slimtune_quant.json").read_text())
    assert manifest["method"] == "lq_lora" and manifest["pv_tuning"] is True
    assert manifest["adapters"] and all(a["type"] == "lq_lora" for a in manifest["adapters"].values())
    assert {s["format"].split("-")[0] for s in manifest["quantized"].values()} <= {"nf2", "nf3", "nf4"}
    final = build_for_eval(load_config("full", [*TINY, f"model.name={out / 'final'}"]))
    with torch.no_grad():
        assert torch.equal(final(TOKENS).logits.float(), hook.logits)
    assert report["eval_perplexity"] < report["eval_perplexity_before"]


def test_kill_then_resume_is_bitwise(tmp_path):
    assert_kill_resume_bitwise("lq_lora", [*RUN, "checkpoint.every=2"], tmp_path)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["engine.name=fsdp2"], "lq_lora.pv_tuning=true updates the codes of LQ-LoRA's quantized part"),
        (["optim.in_backward=true"], "not with optim.in_backward=true"),
        (["lq_lora.pv_fraction=0"], "lq_lora.pv_fraction=0.0 must be in (0, 1]"),
        (["quant.method=nf4", "adapter.type=lora"], "not with quant.method=nf4"),  # no Q to tune: refused
    ],
)
def test_what_it_cannot_do_is_one_line(overrides, needle, tmp_path, capsys):
    assert main(["run", "lq_lora", *RUN, *overrides, f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err, err
