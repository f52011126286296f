"""The bench's reading of PostgreSQL's CPU: a backend that exits during a run still counts as PostgreSQL's.

A pool that closes a connection mid-run ends its backend; reading only the live backends at the end lost that
backend's CPU to "other". Real processes here: a backend of the test database made to burn CPU, then closed.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest

from bench.procs import PostgresCpu
from tests.db_faults import dsn_of

BURN = "SELECT count(*) FROM generate_series(1, 2000000)"


def _own_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _gone(pid: int) -> None:
    for _ in range(500):
        if not psutil.pid_exists(pid):
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"backend {pid} did not exit")


@pytest.mark.postgres_only
async def test_a_backend_that_exits_between_two_readings_counts_for_what_it_used_between_them(
    postgres_url: str,
) -> None:
    database = urlsplit(postgres_url).path.lstrip("/")
    conn = await asyncpg.connect(dsn_of(postgres_url))
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    await conn.fetchval(BURN)  # used before the first reading: not the run's
    before = PostgresCpu.read(database)
    used_before = before.ours[pid]
    await conn.fetchval(BURN)
    used_between = _own_cpu(pid) - used_before
    await conn.close()
    await _gone(pid)

    spent = PostgresCpu.read(database).since(before)

    assert used_before > 0.05  # each burn took measurable CPU
    assert used_between > 0.05
    assert spent >= used_between - 0.02  # clock ticks are 10 ms; the live reading alone would give ~0
    assert spent < used_between + used_before / 2  # what it used before the first reading stays out
