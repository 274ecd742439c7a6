"""`slimtune plan`: the table, --json (one JSON object on stdout), --fit (its last line: overrides whose plan
fits), bad input as one `slimtune: error:` line with exit code 2; per-rank sharding under the engines."""

import json

import pytest

from slimtune_testutil import TINY, run_cli

from slimtune import config as C
from slimtune.cli import main
from slimtune.plan.estimate import plan_memory
from slimtune.plan.fit import parse_budget

STREAM = ["data.packing=stream"] if "data.packing" in C.all_keys() else []


def _plan(capfd, *args):
    code = main(["plan", *args])
    out, err = capfd.readouterr()
    return code, out, err


def test_json_is_one_object_and_its_breakdown_sums_to_the_peak(capfd):
    code, out, _ = _plan(capfd, "qlora", *TINY, "--json")
    assert code == 0
    obj = json.loads(out)  # the whole of stdout is one JSON document
    assert isinstance(obj["peak_memory_bytes"], int) and obj["peak_memory_bytes"] > 0
    assert sum(obj["breakdown"].values()) == obj["peak_memory_bytes"]
    assert {"weights.frozen", "weights.trainable", "optimizer.state", "libraries"} <= set(obj["breakdown"])
    assert obj["peak_memory_bytes"] == max(obj["phases"].values())


def test_json_stdout_is_clean_in_a_fresh_process():
    """Nothing a library prints on import reaches stdout (a separate process: fd-level output counts)."""
    r = run_cli("-m", "slimtune", "plan", "lora", *TINY, "--json")
    assert len(r.stdout.strip().splitlines()) == 1
    assert json.loads(r.stdout)["peak_memory_bytes"] > 0


def test_table_lists_components_in_bytes_and_mib(capfd):
    code, out, _ = _plan(capfd, "full", *TINY)
    assert code == 0
    assert "weights.trainable" in out and "optimizer.state" in out and "MiB" in out
    assert out.strip().splitlines()[-2].startswith("predicted peak")
    assert out.strip().splitlines()[-1].startswith("disk (output_dir): checkpoints")  # plan/disk.py


def test_components_follow_the_config():
    base = C.load_config("lora", TINY + STREAM)
    small = plan_memory(base).breakdown
    double = plan_memory(C.replace(base, **{"train.batch_size": 8})).breakdown
    assert double["activations.saved"] > 1.9 * small["activations.saved"]
    q = plan_memory(C.replace(base, **{"quant.method": "nf4"}), device="cpu").breakdown
    assert q["weights.frozen"] < small["weights.frozen"]
    full = C.load_config("full", TINY + STREAM)
    adamw = plan_memory(full).breakdown["optimizer.state"]
    assert plan_memory(C.replace(full, **{"optim.state_bits": 8})).breakdown["optimizer.state"] < adamw / 2


def test_engines_shard_per_rank():
    full = C.load_config("full", TINY + STREAM + ["train.activation_checkpointing=true"])
    ddp = plan_memory(full, world_size=2, device="cuda")
    fsdp = plan_memory(C.replace(full, **{"engine.name": "fsdp2"}), world_size=2, device="cuda")
    zero3 = plan_memory(
        C.replace(full, **{"engine.name": "deepspeed", "deepspeed.zero_stage": 3}), world_size=4, device="cuda"
    )
    assert ddp.breakdown["engine.buffers"] > 0  # DDP's gradient buckets
    assert fsdp.breakdown["optimizer.state"] * 2 == pytest.approx(ddp.breakdown["optimizer.state"], abs=8)
    assert zero3.breakdown["optimizer.state"] * 4 == pytest.approx(ddp.breakdown["optimizer.state"], abs=16)
    assert "cuda_context" in ddp.breakdown and "libraries" not in ddp.breakdown


def test_nproc_and_world_size(capfd, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    _, out, _ = _plan(capfd, "full", *TINY, "engine.name=fsdp2", "--json")
    assert json.loads(out)["world_size"] == 2
    _, out, _ = _plan(capfd, "full", *TINY, "engine.name=fsdp2", "--json", "--nproc", "4")
    assert json.loads(out)["world_size"] == 4


@pytest.mark.parametrize(
    "text,want",
    [("24GiB", 24 * 2**30), ("1.5GiB", 3 * 2**29), ("800MiB", 800 * 2**20), ("2GB", 2 * 10**9), ("1073741824", 2**30)],
)
def test_budget_parsing(text, want):
    assert parse_budget(text) == want


@pytest.mark.parametrize("budget", ["lots", "-1GiB", "12 parsecs", "0"])
def test_bad_budget_is_one_line_and_exit_2(capfd, budget):
    code, out, err = _plan(capfd, "lora", *TINY, f"--fit={budget}")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("slimtune: error: --fit")


def test_bad_override_is_one_line_and_exit_2(capfd):
    code, _, err = _plan(capfd, "lora", "train.bach_size=2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train.batch_size" in err
    code, _, err = _plan(capfd, "lora", *TINY, "train.seq_len=4096")  # tiny-llama's context is 1024
    assert code == 2 and len(err.strip().splitlines()) == 1 and "context of 1024" in err


def _last_tokens(out: str) -> list[str]:
    tokens = out.strip().splitlines()[-1].split()
    assert tokens and all("=" in t for t in tokens)
    return tokens


def test_fit_prints_overrides_whose_plan_is_under_the_budget(capfd):
    base = TINY + STREAM + ["train.seq_len=1024", "train.batch_size=64", "train.activation_checkpointing=false"]
    before = plan_memory(C.load_config("full", base)).peak_memory_bytes
    budget = int(before * 0.93)
    code, out, _ = _plan(capfd, "full", *base, "--fit", str(budget))
    assert code == 0
    tokens = _last_tokens(out)
    fitted = C.load_config("full", base + tokens)  # the overrides load as `slimtune run` would take them
    assert plan_memory(fitted).peak_memory_bytes <= budget
    t = fitted.train
    assert t.batch_size * t.grad_accum == 64  # the global batch is kept


def test_fit_when_it_already_fits_prints_the_current_knobs(capfd):
    code, out, _ = _plan(capfd, "lora", *TINY, "--fit", "100GiB")
    assert code == 0
    tokens = dict(t.split("=", 1) for t in _last_tokens(out))
    assert tokens["train.batch_size"] == "4" and tokens["train.activation_checkpointing"] == "false"


def test_fit_that_cannot_fit_names_the_smallest_peak(capfd):
    code, out, err = _plan(capfd, "lora", *TINY, "--fit", "10MiB")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "smallest predicted peak" in err


def test_plan_is_fast_after_imports():
    import time

    cfg = C.load_config("lora", TINY)
    plan_memory(cfg)
    t0 = time.perf_counter()
    plan_memory(C.replace(cfg, **{"train.batch_size": 2}))
    assert time.perf_counter() - t0 < 2.0
