"""PostgreSQL's set-based batch writes (``notifier.db.bulk``) store exactly what the executemany path stores.

The same writes run twice on PostgreSQL, once through the executemany statements SQLite uses and once through
the array statements, with the same ids and values; the rows read back must be equal.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from notifier import db
from notifier.db import bulk, deliveries, events
from notifier.db.models import ATTEMPTS, DELIVERIES, EVENTS, TRANSITIONS, Delivery
from notifier.types import DeliveryStatus, utcnow
from tests.conftest import Sessions
from tests.sql_statements import Statement, recorded_statements

pytestmark = pytest.mark.postgres_only

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
ELSEWHERE = dt.timezone(dt.timedelta(hours=5, minutes=30))  # stored as the same instant in UTC
EVENT = uuid.UUID(int=1)
EVENT_ROW: dict[str, Any] = {
    "id": EVENT,
    "type": "booking.confirmed",
    "body_hash": "0" * 64,
    "data": {},
    "recipients": [],
    "received_at": NOW,
}
IDS = [uuid.UUID(int=100 + i) for i in range(6)]
TOKEN = uuid.UUID(int=7)
GROUP = uuid.UUID(int=8)
# Strings an array literal would have to escape: the binary protocol must carry them unchanged.
AWKWARD = ["a,b", '{"x"}', "back\\slash", "NULL", "", "ünïcødé ✓", "'quoted'"]


@pytest.fixture
def statements(postgres_engine: AsyncEngine) -> Iterator[list[Statement]]:
    with recorded_statements(postgres_engine) as seen:
        yield seen


def delivery_row(i: int) -> dict[str, Any]:
    """A row with every key ``state.planned`` gives, NULLs included."""
    return {
        "id": IDS[i],
        "event_id": EVENT,
        "event_type": "booking.confirmed",
        "user_id": AWKWARD[i % len(AWKWARD)],
        "channel": ("email", "push", "in_app")[i % 3],
        "provider": "knock" if i % 2 else None,
        "status": DeliveryStatus.queued if i % 2 else "deferred",
        "reason": None if i % 2 else "quiet_hours",
        "not_before": None if i % 2 else NOW.astimezone(ELSEWHERE) + dt.timedelta(hours=i),
        "digest_key": None,
        "fallback_of": IDS[0] if i == 3 else None,
        "send_group": GROUP if i in (2, 3) else None,
        "created_at": NOW,
        "updated_at": NOW,
    }


def change(delivery: Delivery, i: int, step: int) -> Delivery:
    """Set every ``MUTABLE_COLUMNS`` value kind: strings and enums, NULLs, uuids, integers, timestamps."""
    when = NOW + dt.timedelta(minutes=step, microseconds=i)
    delivery.status = (DeliveryStatus.sending, "sent", DeliveryStatus.failed, "queued")[(i + step) % 4]
    delivery.reason = None if (i + step) % 2 else "retries_exhausted"
    delivery.not_before = None if i % 2 else when.astimezone(ELSEWHERE)
    delivery.claim_token = TOKEN if step == 1 else None
    delivery.claimed_until = when + dt.timedelta(seconds=30) if step == 1 else None
    delivery.attempts = step + i
    delivery.retry_base = i
    delivery.provider_message_id = AWKWARD[(i + step) % len(AWKWARD)] if i % 3 else None
    delivery.last_error = None if i % 2 else f"error {i}/{step}: " + AWKWARD[i % len(AWKWARD)]
    delivery.updated_at = when
    delivery.sent_at = when if delivery.status == "sent" else None
    delivery.send_group = GROUP if i in (2, 3) and step < 2 else None
    delivery.dispatch_generation = step
    delivery.gave_up_generation = None if i % 2 else step
    delivery.gave_up_count = i + step
    return delivery


def finished(i: int, step: int) -> dict[str, object]:
    sent = (i + step) % 2 == 0
    return {
        "b_delivery_id": IDS[i],
        "b_number": step,
        "started_at": NOW + dt.timedelta(seconds=step),
        "finished_at": NOW.astimezone(ELSEWHERE) + dt.timedelta(seconds=step, milliseconds=i),
        "outcome": "sent" if sent else "retry",
        "http_status": 200 if sent else None,
        "provider_message_id": AWKWARD[i % len(AWKWARD)] if sent else None,
        "error": None if sent else "timed out",
    }


async def scenario(sessions: Sessions) -> None:
    """Batches of one and of many rows through every batch write."""
    async with sessions() as session, session.begin():
        assert await events.insert(session, row=EVENT_ROW)
        await deliveries.insert(session, rows=[delivery_row(i) for i in range(5)])
        # Only some keys: the others get their columns' Python defaults, as with an executemany.
        keys = ("id", "event_id", "event_type", "user_id", "channel", "status")
        await deliveries.insert(session, rows=[{key: delivery_row(5)[key] for key in keys}])
        first = [
            {"id": uuid.UUID(int=200 + i), "delivery_id": d, "from_status": None, "to_status": "queued", "at": NOW}
            for i, d in enumerate(IDS)
        ]
        await deliveries.insert_transitions(session, rows=first)
        one = {"id": uuid.UUID(int=300), "delivery_id": IDS[1], "from_status": "queued", "to_status": "sending"}
        await deliveries.insert_transitions(
            session, rows=[one | {"reason": "x", "note": AWKWARD[1], "at": NOW.astimezone(ELSEWHERE)}]
        )
    for step in (1, 2):
        async with sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, IDS)
            attempts = [
                {"id": uuid.UUID(int=1000 * step + i), "delivery_id": d, "number": step, "started_at": NOW}
                | {"via": "local", "send_group": GROUP if i == 2 else None}
                for i, d in enumerate(IDS)
            ]
            await deliveries.insert_attempts(session, rows=attempts)
            await deliveries.write(session, [change(locked[d], i, step) for i, d in enumerate(IDS)])
            await deliveries.finish_attempts(session, outcomes=[finished(i, step) for i in range(len(IDS))])
    async with sessions() as session, session.begin():
        locked = await deliveries.lock_many(session, IDS[:2])
        await deliveries.write(session, [change(locked[IDS[0]], 0, 3)])  # one row
        # The same delivery twice in one batch: the last values win, as with an executemany.
        twice = [change(Delivery(**locked[IDS[1]].model_dump()), 1, 4), change(locked[IDS[1]], 1, 5)]
        await deliveries.write(session, twice)
        await deliveries.finish_attempts(session, outcomes=[finished(0, 2) | {"error": "again"}])  # one row
        await deliveries.insert_attempts(
            session, rows=[{"id": uuid.UUID(int=9999), "delivery_id": IDS[0], "number": 3, "started_at": NOW}]
        )


async def stored(sessions: Sessions) -> dict[str, list[tuple[Any, ...]]]:
    async with sessions() as session:
        return {
            table.name: [tuple(row) for row in await session.execute(sa.select(table).order_by(*table.primary_key))]
            for table in (DELIVERIES, ATTEMPTS, TRANSITIONS)
        }


def use(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every batch write through the arrays, or through the executemany statements (used for small batches
    and on SQLite)."""
    monkeypatch.setattr(bulk, "MIN_ROWS", 1 if path == "arrays" else 10**9)


async def test_array_writes_store_what_executemany_stores(
    postgres_engine: AsyncEngine, statements: list[Statement], monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    start = utcnow()
    with monkeypatch.context() as patched:
        use("executemany", patched)
        await scenario(sessions)
    by_executemany = await stored(sessions)
    assert any(s.many for s in statements)
    async with sessions() as session, session.begin():
        await session.execute(sa.delete(EVENTS))  # and, by cascade, the deliveries, attempts and transitions
    statements.clear()
    use("arrays", monkeypatch)
    await scenario(sessions)
    by_arrays = await stored(sessions)

    writes = [s for s in statements if s.sql.startswith(("UPDATE", "INSERT INTO deliver"))]
    assert len(writes) == 14  # every batch write of the scenario: one statement each
    assert all("unnest(" in s.sql and s.on_driver for s in writes)
    assert not any(s.many for s in statements)
    assert without_defaulted(by_arrays) == without_defaulted(by_executemany)
    assert [len(rows) for rows in by_arrays.values()] == [len(IDS), 2 * len(IDS) + 1, len(IDS) + 1]
    # The row inserted with only some keys got its created_at from Python, at a different time each run.
    at = DELIVERIES.c.keys().index("created_at")
    for rows in (by_executemany, by_arrays):
        [minimal] = [row for row in rows["deliveries"] if row[0] == IDS[5]]
        assert minimal[at] >= start


def without_defaulted(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows without the ``created_at`` the minimal delivery got by default."""
    at = DELIVERIES.c.keys().index("created_at")
    return rows | {"deliveries": [r[:at] + r[at + 1 :] if r[0] == IDS[5] else r for r in rows["deliveries"]]}


@pytest.mark.parametrize("path", ["arrays", "executemany"])
async def test_a_value_too_long_is_refused_not_cut(
    postgres_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # A cast to VARCHAR(n)[] would cut it silently; the arrays are VARCHAR[], so the column refuses it.
    use(path, monkeypatch)
    sessions = db.create_session_factory(postgres_engine)
    async with sessions() as session, session.begin():
        await events.insert(session, row=EVENT_ROW)
        await deliveries.insert(session, rows=[delivery_row(0)])
    with pytest.raises(sa.exc.DBAPIError) as refused:
        await write_changed(sessions, status="s" * 21)  # deliveries.status is VARCHAR(20)
    assert db.refused_values(refused.value)
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        await write_changed(sessions, updated_at=NOW.replace(tzinfo=None))
    async with sessions() as session:
        [status] = (await session.execute(sa.select(DELIVERIES.c.status))).scalars()
    assert status == "deferred"


async def write_changed(sessions: Sessions, **values: object) -> None:
    async with sessions() as session, session.begin():
        delivery = (await deliveries.lock_many(session, [IDS[0]]))[IDS[0]]
        for name, value in values.items():
            setattr(delivery, name, value)
        await deliveries.write(session, [delivery])


async def test_every_batch_write_is_one_array_statement_on_the_driver(
    postgres_engine: AsyncEngine, statements: list[Statement]
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    rows = [delivery_row(0) | {"id": uuid.uuid4(), "user_id": f"u{i}"} for i in range(3)]
    async with sessions() as session, session.begin():
        await events.insert(session, row=EVENT_ROW)
        await deliveries.insert(session, rows=rows[:1])
        await deliveries.insert(session, rows=rows[1:])
        locked = list((await deliveries.lock_many(session, [row["id"] for row in rows])).values())
        await deliveries.write(session, locked[:1])
        await deliveries.write(session, locked)
    writes = [
        s.sql.split()[0] + (" arrays" if "unnest(" in s.sql else "") + (" on the driver" if s.on_driver else "")
        for s in statements
        if " deliveries " in s.sql[:25]
    ]
    assert writes == ["INSERT arrays on the driver"] * 2 + ["UPDATE arrays on the driver"] * 2
    async with sessions() as session:
        stored = (await session.execute(sa.select(DELIVERIES.c.id, DELIVERIES.c.user_id))).all()
    assert sorted(stored) == sorted((row["id"], row["user_id"]) for row in rows)


async def test_a_transaction_begun_on_the_driver_is_the_sessions(
    postgres_engine: AsyncEngine, statements: list[Statement]
) -> None:
    # SQLAlchemy's adapter begins the transaction before the first statement it runs itself; a statement sent on
    # the driver first begins it the same way, so the write is inside the session's transaction and a rollback
    # undoes it.
    sessions = db.create_session_factory(postgres_engine)
    async with sessions() as session, session.begin():
        await events.insert(session, row=EVENT_ROW)
    async with sessions() as session:
        async with session.begin():
            await deliveries.insert(session, rows=[delivery_row(0)])
            await deliveries.insert(session, rows=[delivery_row(1)])
            await session.rollback()
        count = (await session.execute(sa.select(sa.func.count()).select_from(DELIVERIES))).scalar_one()
    assert count == 0
    assert [s.on_driver for s in statements if s.sql.startswith("INSERT INTO deliveries")] == [True, True]


async def test_a_refused_value_on_the_driver_is_sqlalchemys_error(postgres_engine: AsyncEngine) -> None:
    sessions = db.create_session_factory(postgres_engine)
    async with sessions() as session, session.begin():
        await events.insert(session, row=EVENT_ROW)
        await deliveries.insert(session, rows=[delivery_row(0)])
    async with sessions() as session, session.begin():
        await session.execute(sa.select(1))  # so that the insert goes on the driver
        with pytest.raises(sa.exc.IntegrityError) as duplicate:
            await deliveries.insert(session, rows=[delivery_row(0)])  # the same id
        await session.rollback()
    assert "duplicate key" in str(duplicate.value)
    assert duplicate.value.params is None  # the values never reach an error (or a log line)
