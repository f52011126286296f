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
        dispatch_processes=0,  # the embedded shape; the split one has its own test below
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


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("postgres_server")
def test_a_tiny_split_run_counts_the_dispatch_processes_in_rss_and_cpu(tmp_path: Path) -> None:
    from bench.harness import Options, Run

    options = Options(
        base_events=6,
        base_users=8,
        scales=(1,),
        headline=1,
        concurrency=4,
        connections=2,
        dispatch_processes=2,
        raw=False,
        bullmq=False,
        qstash=False,
        half_rate=False,
        results=tmp_path,
        timeout=60,
        stats_wait=0,
    )
    report = Run(options).main()

    run = report["headline"]["notifier"]
    assert run["accepted"] == run["events"] == 6, run["errors"]
    assert run["dispatched"] > 0
    assert run["by_status"].get("sent", 0) == run["dispatched"]
    assert run["receipts_missing"] == 0
    assert report["options"]["dispatch_processes"] == 2
    text = (tmp_path / "report.md").read_text()
    assert "| notifier (API + 2 dispatch processes) |" in text
    assert "2 `notifier worker` process(es)" in text
    logs = sorted(path.name for path in tmp_path.glob("*/logs/notifier-worker-*.log"))
    assert logs == ["notifier-worker-0.log", "notifier-worker-1.log"]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("postgres_server")
def test_dispatch_processes_are_children_of_the_service_pid_and_share_the_concurrency(tmp_path: Path) -> None:
    import os

    from bench import database, procs, services

    name = f"bench_smoke_tree_{os.getpid()}"
    asyncio.run(database.create(name))
    try:
        with services.stack(tmp_path / "logs") as running:
            providers = services.start_providers(running, tmp_path)
            child = services.start_notifier(running, "notifier", name, providers, concurrency=3, dispatch_processes=2)
            # The RSS sampler, the CPU count and py-spy follow this tree; the API is its root.
            commands = [" ".join(process.cmdline()) for process in procs.tree(child.pid)]
            assert "uvicorn bench.serve:notifier_app" in commands[0]
            assert sum("notifier.cli worker" in command for command in commands) == 2
        # Stopping the service waited for its dispatch processes to drain and exit.
        logs = [(tmp_path / "logs" / f"notifier-worker-{i}.log").read_text() for i in range(2)]
        assert ['"workers": 2' in logs[0], '"workers": 1' in logs[1]] == [True, True]
        assert all("notifier worker stopped" in log for log in logs)
    finally:
        asyncio.run(database.drop(name))
