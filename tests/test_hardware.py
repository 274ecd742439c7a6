"""`model.dtype=auto`: bf16 where the CPU has AVX512-BF16 / AMX, fp32 on AVX2 only; report.json records the
choice and why; config.yaml keeps `auto` and a resumed run continues in the checkpoint's dtype; eval and
export compute in fp32 unless model.dtype is given."""

import json

import pytest
import yaml

from slimtune import hardware
from slimtune.cli import main
from slimtune.config import load_config
from slimtune.errors import SlimtuneError

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx avx2 fma {extra}
bogomips\t: 4800.00
"""


@pytest.mark.parametrize(
    "extra, dtype",
    [
        ("avx512f avx512_bf16", "bfloat16"),
        ("amx_tile amx_bf16", "bfloat16"),
        ("", "float32"),
        ("avx512f avx512bw", "float32"),
    ],
)
def test_cpu_flags_pick_the_dtype(extra, dtype):
    flags = hardware.cpu_flags(CPUINFO.format(extra=extra))
    assert "avx2" in flags
    got, reason = hardware.cpu_choice(flags)
    assert got == dtype and reason
    assert reason.startswith("CPU has no ") == (dtype == "float32")


def test_unknown_flags_mean_fp32():
    assert hardware.cpu_flags("processor: 0\n") == set()
    assert hardware.cpu_choice(set())[0] == "float32"


def test_resolve_keeps_a_given_dtype_and_defaults_commands_to_fp32(monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda kind: ("bfloat16", "fake avx512_bf16"))
    auto = load_config("lora", ["model.name=tiny-llama"])
    assert auto.model.dtype == "auto"
    assert hardware.resolve_dtype(auto, "cpu")[0].model.dtype == "bfloat16"
    assert hardware.fixed_dtype(auto).model.dtype == "float32"
    cfg, choice = hardware.resolve_dtype(auto, "cpu", resumed="float32")
    assert cfg.model.dtype == "float32" and "checkpoint" in choice["reason"]
    given = load_config("lora", ["model.dtype=float32"])
    assert hardware.resolve_dtype(given, "cpu") == (given, {"dtype": "float32", "reason": "model.dtype=float32 given"})


def _auto_run(out, *extra):
    from slimtune_testutil import TINY

    args = [a for a in TINY if not a.startswith("model.dtype=")]
    return main(
        ["run", "lora", *args, "model.dtype=auto", "train.lr=1e-2", "checkpoint.every=2", *extra, f"output_dir={out}"]
    )


def test_auto_run_reports_its_choice_and_resumes(tmp_path, monkeypatch):
    from slimtune_testutil import losses

    monkeypatch.setattr(hardware, "detect", lambda kind: ("bfloat16", "fake: CPU has avx512_bf16"))
    assert _auto_run(tmp_path / "ref", "train.max_steps=4") == 0
    report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert report["compute_dtype"] == "bfloat16" and "avx512_bf16" in report["compute_dtype_reason"]
    assert yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["model"]["dtype"] == "auto"
    state = json.loads((tmp_path / "ref" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["compute_dtype"] == "bfloat16"

    # stop after step 2, then resume on "another machine" (fp32 by detection): the checkpoint's bf16 goes on
    assert _auto_run(tmp_path / "b", "train.max_steps=3") == 0
    monkeypatch.setattr(hardware, "detect", lambda kind: ("float32", "fake: avx2 only"))
    assert _auto_run(tmp_path / "b", "train.max_steps=4", "resume=true") == 0
    resumed = json.loads((tmp_path / "b" / "report.json").read_text())
    assert resumed["compute_dtype"] == "bfloat16" and "checkpoint" in resumed["compute_dtype_reason"]
    assert losses(tmp_path / "b") == losses(tmp_path / "ref")

    # an explicit dtype other than the checkpoint's is refused; the same one resumes
    from slimtune.formats.checkpoint import check_resume

    ckpt = tmp_path / "ref" / "checkpoints" / "step_2"
    with pytest.raises(SlimtuneError, match="model.dtype='float32' differs from 'bfloat16'"):
        check_resume(ckpt, load_config(str(tmp_path / "ref" / "config.yaml"), ["model.dtype=float32"]), 1)
    check_resume(ckpt, load_config(str(tmp_path / "ref" / "config.yaml"), ["model.dtype=bfloat16"]), 1)

    # export merges an auto run in fp32 (exact), whatever the run computed in
    assert main(["export", str(tmp_path / "ref"), "--merge"]) == 0
    from slimtune_testutil import safetensors_dir

    assert {t.dtype for t in safetensors_dir(tmp_path / "ref" / "merged").values()} == {__import__("torch").float32}


def test_an_older_fp32_checkpoint_resumes_under_auto(tmp_path, monkeypatch):
    """A checkpoint written before `auto` (config model.dtype=float32, no compute_dtype) resumes in fp32."""
    from slimtune_testutil import TINY

    monkeypatch.setattr(hardware, "detect", lambda kind: ("bfloat16", "fake"))
    out = tmp_path / "old"
    assert main(["run", "lora", *TINY, "train.max_steps=3", "checkpoint.every=2", f"output_dir={out}"]) == 0
    state_file = out / "checkpoints" / "step_2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["compute_dtype"]
    state_file.write_text(json.dumps(state))
    from slimtune.io import file_checksum
    from slimtune.formats.checkpoint import CHECKSUMS

    listing = json.loads((state_file.parent / CHECKSUMS).read_text())  # the older state, checksummed
    listing["checksums"][state_file.name] = file_checksum(state_file)
    (state_file.parent / CHECKSUMS).write_text(json.dumps(listing))
    assert _auto_run(out, "train.max_steps=4", "resume=true") == 0
    assert json.loads((out / "report.json").read_text())["compute_dtype"] == "float32"


def test_eval_computes_in_fp32_unless_model_dtype_is_given(monkeypatch, capsys):
    monkeypatch.setattr(hardware, "detect", lambda kind: ("bfloat16", "fake"))
    args = ["eval", "model.name=tiny-llama", "train.seq_len=64", "eval.max_batches=1"]
    capsys.readouterr()
    assert main(args) == 0  # the default auto: fp32
    plain = capsys.readouterr()
    assert main([*args, "model.dtype=auto"]) == 0
    given = capsys.readouterr()
    assert "compute dtype" not in plain.err and "compute dtype bfloat16 (model.dtype=auto: fake)" in given.err
    assert json.loads(plain.out)["eval_loss"] != json.loads(given.out)["eval_loss"]
