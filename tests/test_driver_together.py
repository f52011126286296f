"""``driver.together``: the writes of a block sent as one statement (data-modifying ``WITH`` parts) store exactly
what the same writes store one by one; a block that fails, or a part that is refused, stores nothing."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from notifier import db
from notifier.db import deliveries, driver, events
from notifier.db.models import ATTEMPTS, DELIVERIES, TRANSITIONS
from notifier.types import DeliveryStatus
from tests.conftest import Sessions
from tests.sql_statements import recorded_statements

pytestmark = pytest.mark.postgres_only

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
EVENT = uuid.UUID(int=1)
IDS = [uuid.UUID(int=100 + i) for i in range(3)]


async def plant(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        await events.insert(
            session, row={"id": EVENT, "type": "booking.confirmed", "body_hash": "0" * 64, "received_at": NOW}
        )
        await deliveries.insert(
            session,
            rows=[
                {
                    "id": delivery_id,
                    "event_id": EVENT,
                    "event_type": "booking.confirmed",
                    "user_id": f"user-{i}",
                    "channel": "email",
                    "status": DeliveryStatus.queued,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i, delivery_id in enumerate(IDS)
            ],
        )


async def claim_writes(sessions: Sessions, *, note: str = "claimed", together: bool) -> None:
    """What a claim writes: the deliveries moved to ``sending``, a transition row and an attempt row each."""
    async with sessions() as session, session.begin():
        locked = await deliveries.lock_many(session, IDS)
        for delivery in locked.values():
            delivery.status, delivery.attempts, delivery.updated_at = DeliveryStatus.sending, 1, NOW
        async with driver.together(session) if together else contextlib.nullcontext():
            await deliveries.write(session, list(locked.values()))
            await deliveries.insert_transitions(
                session,
                rows=[
                    {"id": uuid.UUID(int=200 + i), "delivery_id": d, "from_status": "queued", "to_status": "sending"}
                    | {"reason": None, "note": note, "at": NOW}
                    for i, d in enumerate(IDS)
                ],
            )
            await deliveries.insert_attempts(
                session,
                rows=[
                    {"id": uuid.UUID(int=300 + i), "delivery_id": d, "number": 1, "started_at": NOW, "via": "local"}
                    for i, d in enumerate(IDS)
                ],
            )


async def stored(sessions: Sessions) -> dict[str, list[tuple[Any, ...]]]:
    async with sessions() as session:
        return {
            table.name: [tuple(row) for row in await session.execute(sa.select(table).order_by(*table.primary_key))]
            for table in (DELIVERIES, TRANSITIONS, ATTEMPTS)
        }


async def test_a_blocks_writes_are_one_statement_and_store_what_they_store_one_by_one(
    postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    with recorded_statements(postgres_engine) as statements:
        await claim_writes(sessions, together=True)
    writes = [s for s in statements if not s.sql.startswith("SELECT")]
    assert len(writes) == 1
    assert writes[0].on_driver
    assert writes[0].sql.startswith("WITH w0 AS (UPDATE deliveries")
    together = await stored(sessions)
    assert [len(rows) for rows in together.values()] == [3, 3, 3]

    async with postgres_engine.begin() as connection:
        for table in ("delivery_attempts", "delivery_transitions", "deliveries", "events"):
            await connection.execute(sa.text(f"DELETE FROM {table}"))
    await plant(sessions)
    await claim_writes(sessions, together=False)
    assert await stored(sessions) == together


async def test_a_block_left_by_an_error_sends_nothing(postgres_engine: AsyncEngine) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)

    async def interrupted() -> None:
        async with sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, IDS)
            async with driver.together(session):
                await deliveries.write(session, list(locked.values()))
                raise RuntimeError("before the block ends")

    with recorded_statements(postgres_engine) as statements, pytest.raises(RuntimeError):
        await interrupted()
    assert [s.sql.split()[0] for s in statements] == ["SELECT"]


async def test_a_refused_part_fails_the_whole_statement_as_sqlalchemys_error(postgres_engine: AsyncEngine) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    with pytest.raises(sa.exc.DBAPIError) as raised:
        await claim_writes(sessions, note="x" * 5000, together=True)  # longer than the note column takes
    assert db.refused_values(raised.value)
    written = await stored(sessions)
    assert [row[DELIVERIES.c.keys().index("status")] for row in written["deliveries"]] == ["queued"] * 3
    assert written["delivery_transitions"] == written["delivery_attempts"] == []


async def test_writes_of_one_table_twice_go_one_by_one(postgres_engine: AsyncEngine) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    with recorded_statements(postgres_engine) as statements:
        async with sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, IDS)
            async with driver.together(session):
                for attempts in (1, 2):  # the second sees the first's rows: they cannot share a snapshot
                    for delivery in locked.values():
                        delivery.attempts = attempts
                    await deliveries.write(session, list(locked.values()))
    assert [s.sql.split()[0] for s in statements] == ["SELECT", "UPDATE", "UPDATE"]
    written = await stored(sessions)
    assert {row[DELIVERIES.c.keys().index("attempts")] for row in written["deliveries"]} == {2}
