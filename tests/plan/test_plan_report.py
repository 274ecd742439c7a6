"""report.json carries planned_peak_memory_bytes beside the measured peak; a planner failure leaves the run
alone (stderr line, null)."""

import json

from slimtune_testutil import TINY

from slimtune.cli import main


# README, "Know the memory before launch" and the plan_accuracy table: every predicted peak RSS within 15% of the
# measured one on CPU (benchmarks/plan_accuracy.py TARGET, tiny-llama rows included)
README_BOUND = 0.15


def test_report_has_the_planned_peak(tmp_path, capsys):
    """report.json's planned peak is exactly what `slimtune plan` predicts for the same arguments, and within
    the README's bound of the measured peak RSS. The run is a fresh process, as a user runs it: the planner
    predicts a whole process (libraries included), and a run inside this long-lived test session would start
    from the session's own resident size. CPU pinned: the README's bound is for peak RSS on CPU."""
    import subprocess
    import sys

    args = [*TINY, "train.max_steps=1", "train.device=cpu"]
    cmd = [sys.executable, "-m", "slimtune", "run", "lora", *args, f"output_dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    planned, measured = report["planned_peak_memory_bytes"], report["peak_memory_bytes"]
    assert report["peak_memory_kind"] == "cpu_peak_rss"
    capsys.readouterr()
    assert main(["plan", "lora", *args, "--json"]) == 0
    assert planned == json.loads(capsys.readouterr().out)["peak_memory_bytes"]  # the wiring: the planner's figure
    ratio = planned / measured
    assert abs(ratio - 1) <= README_BOUND, f"planned / measured peak RSS = {ratio:.3f} ({planned} / {measured})"


def test_a_planner_failure_writes_null_and_logs(monkeypatch, tmp_path, capsys):
    """A planner bug never fails a run: report.json's planned peak is null and one line says why."""
    import json

    from slimtune.cli import main
    from slimtune.plan import estimate

    def broken(*a, **k):
        raise ZeroDivisionError("planner bug")

    monkeypatch.setattr(estimate, "plan_memory", broken)
    assert main(["run", "lora", *TINY, "train.max_steps=1", f"output_dir={tmp_path / 'r'}"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["planned_peak_memory_bytes"] is None and report["peak_memory_bytes"] > 0
    err = [line for line in capsys.readouterr().err.splitlines() if "planner bug" in line]
    assert len(err) == 1 and err[0].startswith("slimtune: plan:")
