"""report.json's peak is the run's own: a run in a process that already held more memory reports its peak,
not the process's lifetime high-water mark."""

import json

import torch
from slimtune_testutil import TINY

from slimtune import config as C
from slimtune.trainer.report import peak_memory, reset_peak_memory


def test_reset_starts_a_new_high_water_mark():
    cpu = torch.device("cpu")
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    high, _ = peak_memory(cpu)
    del big
    reset_peak_memory(cpu)
    after, kind = peak_memory(cpu)
    assert kind == "cpu_peak_rss" and after < high - 200 * 2**20


def test_a_run_after_a_bigger_one_reports_its_own_peak(tmp_path):
    from slimtune.trainer import run

    big = torch.ones(2**30 // 4)  # this process peaks 1 GiB above its resident size before the run
    before, _ = peak_memory(torch.device("cpu"))
    del big
    cfg = C.load_config("lora", TINY + ["train.max_steps=1", f"output_dir={tmp_path / 'run'}"])
    run(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["peak_memory_bytes"] < before - 512 * 2**20  # (the lifetime mark would be >= before)
