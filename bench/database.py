"""The bench's PostgreSQL databases: create, migrate, copy users, reset between runs, watch progress."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from notifier import db

PG_ADMIN = os.environ.get("NOTIFIER_BENCH_POSTGRES") or os.environ.get(
    "NOTIFIER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
RUN_TABLES = ("delivery_transitions", "delivery_attempts", "inbox_messages", "deliveries", "events")
TERMINAL = ("sent", "failed", "suppressed", "read")


def dsn(name: str) -> str:
    """The plain (asyncpg) DSN of database ``name`` on the bench's server."""
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def sqlalchemy_url(name: str) -> str:
    return dsn(name).replace("postgresql://", "postgresql+asyncpg://", 1)


async def create(name: str, *, migrate: bool = True) -> None:
    """(Re)create database ``name``, with notifier's schema unless ``migrate`` is False."""
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    if not migrate:
        return
    engine = db.create_engine(sqlalchemy_url(name))
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()


async def drop(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def copy_people(source: str, target: str) -> None:
    """Copy users and preferences (created through notifier's API) into another bench database."""
    src, dst = await asyncpg.connect(dsn(source)), await asyncpg.connect(dsn(target))
    try:
        for table in ("users", "preferences"):
            rows = await src.fetch(f"SELECT * FROM {table}")
            await dst.execute(f"TRUNCATE {table} CASCADE")
            if rows:
                await dst.copy_records_to_table(table, records=[tuple(r) for r in rows], columns=list(rows[0].keys()))
    finally:
        await src.close()
        await dst.close()


async def reset(name: str) -> None:
    """Empty the per-run tables (events, deliveries, ...) and refresh planner statistics."""
    conn = await asyncpg.connect(dsn(name))
    try:
        await conn.execute(f"TRUNCATE {', '.join(RUN_TABLES)} CASCADE")
        await conn.execute("VACUUM ANALYZE users")
        await conn.execute("VACUUM ANALYZE preferences")
    finally:
        await conn.close()


async def wait_done(name: str, *, timeout: float, poll: float = 0.1) -> dict[str, Any]:
    """Wait until no delivery is queued-and-due or sending; return counts by status and the last finish time."""
    conn = await asyncpg.connect(dsn(name))
    try:
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            polls += 1
            pending = await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE status = 'sending'"
                " OR (status = 'queued' AND (not_before IS NULL OR not_before <= now()))"
            )
            if pending == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pending} deliveries still pending in {name} after {timeout}s")
            await asyncio.sleep(poll)
        counts = dict(await conn.fetch("SELECT status, count(*) FROM deliveries GROUP BY status"))
        last = await conn.fetchval("SELECT max(updated_at) FROM deliveries WHERE status IN ('sent', 'failed')")
        rows = await conn.fetchval("SELECT count(*) FROM events")
        return {
            "by_status": {str(k): int(v) for k, v in counts.items()},
            "last_finished": last.timestamp() if last else None,
            "events": int(rows),
            "queries": polls + 3,  # this function's own transactions, to subtract from the database's count
        }
    finally:
        await conn.close()


@dataclass(frozen=True)
class Grouped:
    """A delivery that went, or was to go, in a send group: its recipient and every group it was attempted in."""

    user_id: str
    groups: tuple[str, ...]


async def send_groups(name: str) -> dict[str, Grouped]:
    """The deliveries of database ``name`` with a send group (on the row or on any attempt), by delivery id.

    One transaction. Empty until notifier forms send groups (``deliveries.send_group`` NULL: the delivery
    goes alone).
    """
    conn = await asyncpg.connect(dsn(name))
    try:
        rows = await conn.fetch(
            "SELECT d.id, d.user_id, d.send_group FROM deliveries d WHERE d.send_group IS NOT NULL"
            " UNION SELECT d.id, d.user_id, a.send_group FROM delivery_attempts a"
            " JOIN deliveries d ON d.id = a.delivery_id WHERE a.send_group IS NOT NULL"
        )
    finally:
        await conn.close()
    users: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for row in rows:
        delivery_id = str(row["id"])
        users[delivery_id] = str(row["user_id"])
        groups.setdefault(delivery_id, []).append(str(row["send_group"]))
    return {d: Grouped(users[d], tuple(sorted(g))) for d, g in groups.items()}


async def table_sizes(name: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn(name))
    try:
        rows = await conn.fetch(
            "SELECT relname, n_live_tup FROM pg_stat_user_tables WHERE relname = ANY($1)", list(RUN_TABLES)
        )
        return {str(r["relname"]): int(r["n_live_tup"]) for r in rows}
    finally:
        await conn.close()


async def transactions(name: str) -> dict[str, int]:
    """Committed and rolled-back transactions of database ``name`` so far (one of them is this query)."""
    conn = await asyncpg.connect(dsn(name))
    try:
        row = await conn.fetchrow("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1", name)
        return {"commit": int(row["xact_commit"]), "rollback": int(row["xact_rollback"])}
    finally:
        await conn.close()


async def autovacuum_on() -> bool:
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        return bool(await conn.fetchval("SELECT current_setting('autovacuum') = 'on'"))
    finally:
        await conn.close()


VACUUM_EVERY_SECONDS = 15.0


@contextlib.contextmanager
def standing_in_for_autovacuum(name: str, *, every: float = VACUUM_EVERY_SECONDS) -> Iterator[list[float]]:
    """While the block runs, ``VACUUM (ANALYZE)`` the run's tables of ``name`` every ``every`` seconds.

    Production PostgreSQL runs autovacuum; a server with it off (this machine's CI cluster has
    ``autovacuum = off``) never marks the dead row versions of a queue table reusable nor refreshes
    its planner statistics, so every claim of a long run reads more of them (a soak measured 6.3 ms of
    PostgreSQL CPU per delivery, most of it sequential scans of ``deliveries``). Standing in for it
    keeps long runs production-like, the same for every variant; its CPU counts as PostgreSQL's.
    Yields the duration of each pass; with ``every`` 0 (the server runs autovacuum itself) it does nothing.
    """
    passes: list[float] = []
    if every <= 0:
        yield passes
        return
    stop = threading.Event()

    async def loop() -> None:
        conn = await asyncpg.connect(dsn(name), timeout=5)
        try:
            while not stop.wait(every):
                started = time.monotonic()
                await conn.execute(f"VACUUM (ANALYZE) {', '.join(RUN_TABLES)}")
                passes.append(time.monotonic() - started)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(loop(),), daemon=True)
    thread.start()
    try:
        yield passes
    finally:
        stop.set()
        thread.join()
