"""``./dev bench --gc-probe``: the probe logs real collections in the processes it is loaded into, and a run's
figures count only the service's processes within the run."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

from bench import gcprobe


def run_probed(code: str, logs: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(gcprobe.PROBE), gcprobe.LOG_ENV: str(logs), **extra}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)


def test_the_probe_logs_each_collection_of_a_probed_process(tmp_path: Path) -> None:
    done = run_probed("import gc, os; gc.collect(); gc.collect(1); print(os.getpid())", tmp_path)
    lines = (tmp_path / f"{done.stdout.strip()}.log").read_text().splitlines()
    generations = [int(line.split()[1]) for line in lines]
    pairs = list(itertools.pairwise(generations))
    assert (2, 1) in pairs  # the two asked for, one after the other (the interpreter collects at exit too)
    assert all(int(line.split()[2]) >= 0 for line in lines)


def test_untuned_keeps_notifier_from_tuning_its_collector(tmp_path: Path) -> None:
    code = "from notifier.heap import tune_garbage_collector as t; import gc; print(t(), gc.get_threshold()[0])"
    assert run_probed(code, tmp_path).stdout.split() == ["True", "7000"]
    assert run_probed(code, tmp_path, **{gcprobe.UNTUNED_ENV: "1"}).stdout.split() == ["False", "700"]


def test_a_run_counts_the_service_processes_collections_within_it(tmp_path: Path) -> None:
    (tmp_path / "10.log").write_text("99.0 2 150000\n100.5 0 300\n101.0 2 5000\n102.5 1 2000\n")
    (tmp_path / "11.log").write_text("100.7 0 700\n")
    (tmp_path / "12.log").write_text("101.0 2 90000\n")  # not the service's
    spent = gcprobe.spent(tmp_path, pids=[10, 11, 13], start=100.0, end=102.0, cpu_seconds=0.6, deliveries=3)
    assert spent["collections"] == [2, 0, 1]
    assert spent["ms_by_generation"] == [1.0, 0.0, 5.0]
    assert spent["ms_per_delivery"] == 2.0
    assert spent["share_of_service_cpu_pct"] == 1.0
