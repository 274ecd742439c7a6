"""A QLoRA run's adapter remembers its NF4 base: `slimtune eval` scores it there, and `export --merge
--onto quantized` merges into dequant(Q), the weights the adapter was trained against."""

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.config import load_config


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    from slimtune_testutil import TINY

    out = tmp_path_factory.mktemp("qlora") / "run"
    assert main(["run", "qlora", *TINY, "train.max_steps=3", "train.lr=1e-2", f"output_dir={out}"]) == 0
    return out


def _eval(capsys, *args) -> dict:
    from slimtune_testutil import TINY

    capsys.readouterr()
    assert main(["eval", *TINY, *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_adapter_records_its_quantized_base_and_eval_uses_it(qlora_run, capsys):
    meta = json.loads((qlora_run / "final" / "slimtune_adapter.json").read_text())
    assert meta["model_name"] == "tiny-llama" and meta["quant"]["method"] == "nf4"
    report = json.loads((qlora_run / "report.json").read_text())
    got = _eval(capsys, f"model.name={qlora_run / 'final'}")["eval_perplexity"]
    assert got == pytest.approx(report["eval_perplexity"], rel=1e-6)
    # without the record the adapter lands on the full-precision base, a different model
    meta["quant"] = None
    (qlora_run / "final" / "slimtune_adapter.json").write_text(json.dumps(meta))
    try:
        other = _eval(capsys, f"model.name={qlora_run / 'final'}")["eval_perplexity"]
    finally:
        meta["quant"] = report["config"]["quant"]
        (qlora_run / "final" / "slimtune_adapter.json").write_text(json.dumps(meta))
    assert abs(other - got) > 1e-5 * got  # the tiny random model is near uniform: small, but 10x the tolerance


def test_export_onto_quantized_gives_the_trained_model(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimtune.model.pipeline import build_for_eval

    trained = build_for_eval(load_config(None, [f"model.name={qlora_run / 'final'}"]))
    x = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(input_ids=x).logits
        logits = {}
        for onto in ("quantized", "full"):
            assert main(["export", str(qlora_run), "--merge", "--onto", onto, "--out", str(tmp_path / onto)]) == 0
            logits[onto] = AutoModelForCausalLM.from_pretrained(tmp_path / onto).eval()(input_ids=x).logits
    torch.testing.assert_close(logits["quantized"], want, rtol=1e-4, atol=1e-4)
    assert (logits["full"] - want).abs().max() > 10 * (logits["quantized"] - want).abs().max()
