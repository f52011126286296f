"""A tiny run of the benchmark harness (bench/) so it keeps working: real code paths, a handful of events.

notifier and the raw baseline run as subprocesses on PostgreSQL against the lean fake providers;
BullMQ, the half-rate run and the soak are left out. Nothing here is timed: only the shape of the
report and that the counts add up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import PG_ADMIN, _in_ci


@pytest.fixture
def postgres_server() -> None:
    async def ping() -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        await conn.close()

    try:
        asyncio.run(ping())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL is required under CI=true but unreachable at {PG_ADMIN}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN}")


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("postgres_server")
def test_a_tiny_bench_run_reports_matching_counts_and_positive_ratios(tmp_path: Path) -> None:
    from bench.harness import Options, Run

    options = Options(
        base_events=6,
        base_users=8,
        scales=(1,),
        headline=1,
        concurrency=4,
        connections=2,
        bullmq=False,
        qstash=True,
        half_rate=False,
        results=tmp_path,
        timeout=60,
        stats_wait=0,
    )
    report = Run(options).main()

    headline = report["headline"]
    notifier, raw = headline["notifier"], headline["raw"]
    for run in (notifier, raw, report["qstash"]):
        assert run["accepted"] == run["events"] == 6, run["errors"]
        assert run["rejected"] == 0
        assert run["dispatched"] > 0
        assert run["by_status"].get("sent", 0) == run["dispatched"]
        assert run["receipts_missing"] == 0
        assert run["provider_replays"] == 0
        assert run["peak_rss_mb"] > 0
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            assert run["e2e_latency"][key] is not None
            assert run["accept_latency"][key] is not None
    # Same workload, same plan: the raw baseline writes the rows notifier writes.
    assert raw["planned"] == notifier["planned"]
    assert all(value is not None and value > 0 for value in headline["ratios"].values())
    assert {t["target"] for t in report["targets"]} >= {"ingest_vs_raw", "deliveries_vs_raw", "deliveries_vs_bullmq"}
    assert (tmp_path / "report.json").exists()
    assert "| notifier (local dispatcher) |" in (tmp_path / "report.md").read_text()
