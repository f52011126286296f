"""``driver.alone``: a connection of the pool lent without a session, each statement on it committed by itself;
given back to the pool, or never lent again when a statement on it was lost or cancelled midway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from notifier import db
from notifier.db import driver, inbox
from notifier.db.models import InboxMessage
from notifier.errors import NotReady
from tests.db_faults import end_backend
from tests.fakes.base import free_port
from tests.test_driver_reads import IDS, NOW, plant

BACKEND = driver.Prepared(sa.select(sa.func.pg_backend_pid()))
ASLEEP = driver.Prepared(sa.select(sa.func.pg_sleep(5)))
MESSAGE = {"user_id": "user-0", "event_id": None, "event_type": "payment.received", "title": "t", "body": "b"}
MESSAGE |= {"data": {}, "action_url": None}


async def backend(connection: driver.Alone) -> int:
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
