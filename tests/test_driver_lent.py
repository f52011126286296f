"""Connections of the pool lent without a session: ``driver.alone`` (each statement committed by itself) and
``driver.transaction`` (one transaction: committed at the end of its block, rolled back when the block raises);
given back to the pool, or never lent again when a statement on one was lost or cancelled midway."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from notifier import db
from notifier.db import driver, events, inbox
from notifier.db.models import Event, InboxMessage
from notifier.delivery.state import DeliveryStates, NewDelivery
from notifier.errors import NotReady
from notifier.metrics import Metrics
from tests.conftest import Sessions
from tests.db_faults import end_backend
from tests.fakes.base import free_port
from tests.test_driver_reads import IDS, NOW, plant
from tests.test_store import delivery_row, event_row

BACKEND = driver.Prepared(sa.select(sa.func.pg_backend_pid()))
ASLEEP = driver.Prepared(sa.select(sa.func.pg_sleep(5)))
MESSAGE = {"user_id": "user-0", "event_id": None, "event_type": "payment.received", "title": "t", "body": "b"}
MESSAGE |= {"data": {}, "action_url": None}


async def backend(connection: driver.Lent) -> int:
    [(pid,)] = await driver.fetch(connection, BACKEND, {})
    return int(pid)


async def stored_messages(engine: AsyncEngine) -> list[object]:
    async with db.create_session_factory(engine)() as session:
        return list((await session.execute(sa.select(InboxMessage.delivery_id))).scalars())


@pytest.mark.postgres_only
async def test_a_statement_on_a_lent_connection_commits_by_itself_and_the_connection_goes_back(
    postgres_engine: AsyncEngine,
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    pids: list[int] = []

    async def insert_then_fail() -> None:
        async with driver.alone(sessions) as connection:
            assert connection is not None
            pids.append(await backend(connection))
            await inbox.insert(connection, rows=[{**MESSAGE, "delivery_id": IDS[0]}], now=NOW)
            raise RuntimeError("after the insert")  # nothing to roll back: the INSERT committed

    with pytest.raises(RuntimeError, match="after the insert"):
        await insert_then_fail()
    assert await stored_messages(postgres_engine) == [IDS[0]]
    assert postgres_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with driver.alone(sessions) as connection:
        assert connection is not None
        assert await backend(connection) == pids[0]  # given back to the pool, and lent again


@pytest.mark.postgres_only
async def test_a_connection_lost_under_a_lent_statement_is_invalidated_and_reported(
    postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    async with driver.alone(sessions) as connection:
        assert connection is not None
        lost = await backend(connection)
        sleeping = asyncio.ensure_future(driver.fetch(connection, ASLEEP, {}))
        await asyncio.sleep(0.3)
        await end_backend(lost, postgres_url)
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await sleeping
    assert raised.value.connection_invalidated
    assert db.unavailable(raised.value) == "the database connection was lost"
    async with driver.alone(sessions) as connection:
        assert connection is not None
        assert await backend(connection) != lost


@pytest.mark.postgres_only
async def test_a_lent_connection_cancelled_mid_statement_is_never_lent_again(postgres_engine: AsyncEngine) -> None:
    sessions = db.create_session_factory(postgres_engine)
    started = asyncio.Event()
    pids: list[int] = []

    async def sleep_on_a_lent_connection() -> None:
        async with driver.alone(sessions) as connection:
            assert connection is not None
            pids.append(await backend(connection))
            started.set()
            await driver.fetch(connection, ASLEEP, {})

    task = asyncio.create_task(sleep_on_a_lent_connection())
    await started.wait()
    await asyncio.sleep(0.2)  # the pg_sleep is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert postgres_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with driver.alone(sessions) as connection:
        assert connection is not None
        # Given back as it was, the connection would still be busy with the sleep: another one answers at once.
        assert await asyncio.wait_for(backend(connection), 2) != pids[0]


async def test_a_database_that_cannot_be_reached_is_not_ready() -> None:
    engine = db.create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing")
    try:
        with pytest.raises(NotReady):
            async with driver.alone(db.create_session_factory(engine)):
                pass  # pragma: no cover
    finally:
        await engine.dispose()


async def test_no_connection_is_lent_off_asyncpg(tmp_path: Path) -> None:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'notifier.db'}")
    try:
        async with driver.alone(db.create_session_factory(engine)) as connection:
            assert connection is None  # the caller uses a session
    finally:
        await engine.dispose()


def queued(metrics: Metrics, channel: str) -> float:
    """How many deliveries on ``channel`` the metric counts as having become ``queued``."""
    labels = {"channel": channel, "status": "queued", "reason": ""}
    return metrics.registry.get_sample_value("notifier_deliveries_total", labels) or 0.0


async def stored_events(sessions: Sessions) -> list[uuid.UUID]:
    async with sessions() as session:
        return list((await session.execute(sa.select(Event.id))).scalars())


async def test_a_transaction_commits_at_its_end_and_then_counts_its_deliveries(sessions: Sessions) -> None:
    metrics = Metrics()
    event = event_row()
    async with driver.transaction(sessions) as target:
        assert await events.insert(target, row=event)
        await DeliveryStates(metrics).create(target, [NewDelivery(delivery_row(event["id"], "email"), None)], now=NOW)
        if isinstance(target, driver.Lent):  # (SQLite would make a reader wait for this writer)
            assert await stored_events(sessions) == []  # not before the commit
        assert queued(metrics, "email") == 0
    assert await stored_events(sessions) == [event["id"]]
    assert queued(metrics, "email") == 1


async def test_a_transaction_whose_block_raises_keeps_and_counts_nothing(sessions: Sessions) -> None:
    metrics = Metrics()
    event = event_row()

    async def plan_then_fail() -> None:
        async with driver.transaction(sessions) as target:
            assert await events.insert(target, row=event)
            await DeliveryStates(metrics).create(
                target, [NewDelivery(delivery_row(event["id"], "push"), None)], now=NOW
            )
            raise RuntimeError("after the writes")

    with pytest.raises(RuntimeError, match="after the writes"):
        await plan_then_fail()
    assert await stored_events(sessions) == []
    assert queued(metrics, "push") == 0
    async with driver.transaction(sessions) as target:  # the connection came back out of its transaction
        assert await events.insert(target, row=event)
    assert await stored_events(sessions) == [event["id"]]


@pytest.mark.postgres_only
async def test_a_transaction_whose_connection_is_lost_is_rolled_back_and_the_connection_never_lent_again(
    postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    pids: list[int] = []

    async def lose_the_connection() -> None:
        async with driver.transaction(sessions) as target:
            assert isinstance(target, driver.Lent)
            assert await events.insert(target, row=event_row())
            pids.append(await backend(target))
            await end_backend(pids[0], postgres_url)
            await backend(target)

    with pytest.raises(sa.exc.DBAPIError) as raised:
        await lose_the_connection()
    assert db.unavailable(raised.value) == "the database connection was lost"
    assert await stored_events(sessions) == []
    async with driver.alone(sessions) as connection:
        assert connection is not None
        assert await backend(connection) != pids[0]
