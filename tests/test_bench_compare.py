"""``./dev bench --compare REV``: alternating pairs of runs of another revision and this checkout, and their
per-pair changes (bench/compare.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.compare import bench_argv, compare, summarize


def _report(local: float, raw: float, deliveries: float, qstash: float | None = None) -> dict[str, Any]:
    run = {"cpu_ms_per_delivery": local, "cpu_split": {"service": local, "postgres": 1.0, "machine_busy_pct": 80.0}}
    report: dict[str, Any] = {
        "headline": {
            "notifier": run,
            "raw": {"cpu_ms_per_delivery": raw},
            "ratios": {"deliveries_per_s": deliveries, "ingest_events_per_s": 0.8},
        }
    }
    if qstash is not None:
        report["qstash"] = {"cpu_ms_per_delivery": qstash}
    return report


def test_each_pair_is_compared_within_itself_and_the_median_change_is_reported() -> None:
    pairs = [
        (_report(2.0, 2.0, 1.0, qstash=4.0), _report(1.8, 2.0, 1.1, qstash=4.4)),
        (_report(4.0, 4.0, 1.0, qstash=8.0), _report(3.0, 3.0, 0.9, qstash=6.0)),
        (_report(3.0, 2.0, 1.0, qstash=6.0), _report(2.7, 2.0, 1.2, qstash=5.4)),
    ]
    rows = {row["figure"]: row for row in summarize(pairs)}

    local = rows["service CPU ms/delivery, local"]
    assert (local["base"], local["head"]) == ([2.0, 4.0, 3.0], [1.8, 3.0, 2.7])
    assert local["changes_pct"] == [-10.0, -25.0, -10.0]
    assert local["median_change_pct"] == -10.0
    assert (local["head_better"], local["pairs"]) == (3, 3)
    # Against the raw baseline of the same run: the second pair's head is no better than its base there.
    per_raw = rows["local CPU / raw"]
    assert (per_raw["base"], per_raw["head"]) == ([1.0, 1.0, 1.5], [0.9, 1.0, 1.35])
    assert per_raw["head_better"] == 2
    # Higher is better for throughput.
    assert rows["deliveries/s / raw"]["head_better"] == 2
    assert rows["service CPU ms/delivery, QStash"]["changes_pct"] == [10.0, -25.0, -10.0]
    assert rows["whole machine CPU ms/delivery, local"]["base"] == [3.0, 5.0, 4.0]
    # Figures no run measured (no transaction counts here) are left out, not reported as zero.
    assert "DB xacts/delivery, local" not in rows


def test_a_pair_without_the_qstash_variant_leaves_it_out_of_the_comparison() -> None:
    rows = {row["figure"]: row for row in summarize([(_report(2.0, 2.0, 1.0), _report(1.0, 2.0, 1.0, qstash=3.0))])}
    assert "service CPU ms/delivery, QStash" not in rows
    assert rows["service CPU ms/delivery, local"]["changes_pct"] == [-50.0]


def test_the_runs_get_every_bench_option_but_the_comparisons_own() -> None:
    argv = ["--compare", "abc123", "--scales", "4", "--pairs=3", "--no-bullmq", "--results", "/tmp/x", "--seed", "9"]
    assert bench_argv(argv) == ["--scales", "4", "--no-bullmq", "--seed", "9"]


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("postgres_server")
def test_a_tiny_comparison_runs_both_sides_in_turn_and_removes_its_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = "--users 8 --events 6 --scales 1 --concurrency 4 --connections 2 --dispatch-processes 0"
    argv = [*tiny.split(), "--no-bullmq", "--no-half-rate", "--no-qstash", "--stats-wait", "0", "--timeout", "60"]
    monkeypatch.chdir(tmp_path)  # the results directory given relative to where the bench is started
    # The base side runs with this interpreter (its checkout's own ./dev would first build a virtualenv).
    assert compare("HEAD", 2, argv, Path("results"), base_command=[sys.executable, "-m", "bench"]) == 0

    [out] = (tmp_path / "results").glob("compare-*")
    result = json.loads((out / "compare.json").read_text())
    assert [time.split()[1] for time in result["times"]] == ["base", "head", "head", "base"]
    rows = {row["figure"]: row for row in result["figures"]}
    local = rows["service CPU ms/delivery, local"]
    assert local["pairs"] == 2
    assert all(value > 0 for value in local["base"] + local["head"])
    for side in ("base-1", "head-1", "head-2", "base-2"):
        report = json.loads((out / side / "report.json").read_text())
        assert report["headline"]["notifier"]["accepted"] == 6
    assert "| service CPU ms/delivery, local |" in (out / "compare.md").read_text()
    repo = Path(__file__).resolve().parents[1]
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True, check=True).stdout
    assert str(out) not in worktrees
    assert not (out / "base-checkout").exists()
