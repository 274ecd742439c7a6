"""report.json carries planned_peak_memory_bytes beside the measured peak; a planner failure leaves the run
alone (stderr line, null)."""

import json

from slimtune_testutil import TINY

from slimtune import config as C


def test_report_has_the_planned_peak(tmp_path):
    """In a fresh process, as a user runs it: the planner predicts a whole process (libraries included), and
    a run inside a long-lived process (this test session) starts from that process's own resident size."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "slimtune", "run", "lora", *TINY, "train.max_steps=1", f"output_dir={tmp_path / 'run'}"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    planned, measured = report["planned_peak_memory_bytes"], report["peak_memory_bytes"]
    assert isinstance(planned, int) and planned > 0
    assert 0.5 < planned / measured < 2  # the same order as the measured peak (accuracy: benchmarks/)


def test_a_planner_failure_writes_null_and_logs(monkeypatch, capsys):
    from slimtune.plan import estimate
    from slimtune.plan.report import with_planned_peak

    def broken(*a, **k):
        raise ZeroDivisionError("planner bug")

    monkeypatch.setattr(estimate, "plan_memory", broken)

    class Engine:
        def report(self):
            return {"offload": 1}

    class Built:
        engine = Engine()

    built = with_planned_peak(Built(), C.load_config("lora", TINY), 1, "cpu")
    assert built.engine.report() == {"offload": 1, "planned_peak_memory_bytes": None}
    err = capsys.readouterr().err
    assert "planner bug" in err and len(err.strip().splitlines()) == 1
