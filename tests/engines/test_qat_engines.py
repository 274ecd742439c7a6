"""QAT (qat.method) on 2 processes (gloo): FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 follow DDP step for step with the
linears fake-quantized (every rank quantizes the whole, gathered weight), and each final/ is the quantized
checkpoint, scoring as DDP's does."""

import json

import pytest

from slimtune.cli import main
from slimtune_testutil import TINY, close_curves, losses, torchrun2

pytest.importorskip("deepspeed")

ENGINES = {
    "fsdp2": ["engine.name=fsdp2"],
    "z2": ["engine.name=deepspeed", "deepspeed.zero_stage=2"],
    "z3": ["engine.name=deepspeed", "deepspeed.zero_stage=3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    torchrun2("qat", "qat.method=nf3", "checkpoint.every=0", f"output_dir={root / 'ddp'}")
    for name, overrides in ENGINES.items():
        torchrun2("qat", "qat.method=nf3", "checkpoint.every=0", *overrides, f"output_dir={root / name}")
    return root


def _ppl(run_dir, capsys) -> float:
    capsys.readouterr()
    assert main(["eval", *TINY, f"model.name={run_dir / 'final'}", "eval.max_batches=2"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_perplexity"]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_qat_follows_ddp_on_every_engine(runs, engine, capsys):
    close_curves(losses(runs / engine), losses(runs / "ddp"))
    manifest = json.loads((runs / engine / "final" / "slimtune_quant.json").read_text())
    assert manifest["method"] == "nf3" and len(manifest["quantized"]) == 14
    ppl, ref = _ppl(runs / engine, capsys), _ppl(runs / "ddp", capsys)
    assert abs(ppl - ref) <= 1e-3 * ref, (ppl, ref)
