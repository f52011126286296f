"""Database faults while events are posted and deliveries are in flight: connections killed, the server restarted.

The producer behaves as the contract asks: a 5xx or a dropped connection is retried with the same
idempotency key. Afterwards every delivery is terminal, every event exists once with all of its
deliveries (no partial writes), and the provider created one notification per sent delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from notifier import db
from tests.conftest import PG_ADMIN, live_service, make_settings
from tests.fakes.onesignal import OneSignalFake
from tests.reliability.conftest import PrivateCluster
from tests.reliability.ledger import (
    Providers,
    all_terminal,
    assert_exactly_once,
    check_events,
    eventually,
    payment_event,
    post_until_answered,
    read_record,
)

pytestmark = pytest.mark.postgres_only


@contextlib.asynccontextmanager
async def killing_backends(admin_dsn: str, database: str, *, every: float = 0.25) -> AsyncIterator[list[int]]:
    """Terminate every backend of ``database`` over and over (from an admin connection) until the block ends."""
    kills: list[int] = []
    admin = await asyncpg.connect(admin_dsn)
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
            kills.append(int(killed))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    task = asyncio.create_task(loop())
    try:
        yield kills
    finally:
        stop.set()
        await task
        await admin.close()


async def post_all_retrying(
    url: str, bodies: list[dict[str, Any]], *, within: float, failures: list[str] | None = None
) -> list[httpx.Response]:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        return await asyncio.gather(
            *(post_until_answered(client, "/v1/events", b, deadline=deadline, failures=failures) for b in bodies)
        )


async def test_connections_killed_mid_request_and_mid_dispatch_lose_and_double_nothing(
    postgres_url: str, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.latency = 0.05  # attempts stay in flight while their connections are killed
    providers = Providers(onesignal=onesignal_fake)
    settings = make_settings(
        postgres_url, workers=4, claim_lease_seconds=1.0, retry_backoff_scale=0.0002, **providers.settings()
    )
    database = postgres_url.rsplit("/", 1)[1]
    bodies: list[dict[str, Any]] = []
    failures: list[str] = []
    with live_service(settings) as live:
        async with killing_backends(PG_ADMIN, database, every=0.3) as kills:
            # Post in small concurrent batches until some requests were cut off mid-way (bounded).
            deadline = time.monotonic() + 30
            while len(bodies) < 12 or (not failures and time.monotonic() < deadline):
                start = len(bodies)
                batch = [payment_event(f"killed-{n}", f"u-{n}-a", f"u-{n}-b") for n in range(start, start + 3)]
                bodies += batch
                answers = await post_all_retrying(live.url, batch, within=60, failures=failures)
                assert {r.status_code for r in answers} <= {200, 202}, [r.text for r in answers]
            await asyncio.sleep(1.0)  # keep killing while the dispatcher works through them
        assert sum(kills) > 0, "no connection was killed"
        assert failures, "no request was cut off: the test proved nothing"
        await eventually(lambda: all_terminal(postgres_url), timeout=60, what="every delivery to finish")
        async with httpx.AsyncClient(base_url=live.url, trust_env=False) as client:
            assert (await client.get("/readyz")).status_code == 200
    record = await read_record(postgres_url)
    check_events(record, bodies)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))


async def test_a_restarted_database_server_is_recovered_from(
    private_postgres: PrivateCluster, onesignal_fake: OneSignalFake
) -> None:
    admin = await asyncpg.connect(private_postgres.dsn())
    await admin.execute('CREATE DATABASE "notifier"')
    await admin.close()
    url = private_postgres.url("notifier")
    engine = db.create_engine(url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()
    onesignal_fake.latency = 0.3  # deliveries are in flight when the server goes down
    providers = Providers(onesignal=onesignal_fake)
    settings = make_settings(
        url, workers=4, claim_lease_seconds=1.0, retry_backoff_scale=0.0002, **providers.settings()
    )
    bodies = [payment_event(f"restart-{i}", f"u-{i}") for i in range(12)]
    with live_service(settings) as live:
        before = await post_all_retrying(live.url, bodies[:6], within=30)
        await eventually(lambda: onesignal_fake.in_flight > 0, timeout=30, what="a push in flight")
        during = asyncio.ensure_future(post_all_retrying(live.url, bodies[6:], within=60))
        await asyncio.to_thread(private_postgres.pg_ctl, "restart", "-m", "fast")
        after = await during
        assert {r.status_code for r in before + after} <= {200, 202}
        onesignal_fake.latency = 0.0
        await eventually(lambda: all_terminal(url), timeout=60, what="every delivery to finish")
        async with httpx.AsyncClient(base_url=live.url, trust_env=False) as client:
            assert (await client.get("/readyz")).status_code == 200
    record = await read_record(url)
    check_events(record, bodies)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))


async def test_the_first_readiness_probe_after_the_database_dropped_its_connections_is_ready(
    postgres_url: str,
) -> None:
    # Pooled connections are not pinged before use, so a probe may draw one the server has closed. The
    # probe asks again on a fresh connection instead of calling a healthy database unreachable.
    settings = make_settings(postgres_url, embedded_dispatcher=False)  # nothing else touches the pool
    database = postgres_url.rsplit("/", 1)[1]
    with live_service(settings) as live:
        async with httpx.AsyncClient(base_url=live.url, trust_env=False) as client:
            assert (await client.get("/readyz")).status_code == 200  # a connection now idles in the pool
            admin = await asyncpg.connect(PG_ADMIN)
            try:
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    database,
                )
            finally:
                await admin.close()
            assert killed > 0
            assert [(await client.get("/readyz")).status_code for _ in range(2)] == [200, 200]
