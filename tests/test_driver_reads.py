"""The claim and lock reads and the inbox rows' insert (on the asyncpg connection on PostgreSQL,
``notifier.db.driver``; through the session on SQLite) give the objects the ORM would load: every column equal and
of the same type, detached, unmodified."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from notifier import db
from notifier.db import deliveries, digests, events, inbox, users
from notifier.db.models import Delivery, Event, InboxMessage, User
from notifier.types import DeliveryStatus, utcnow
from tests.conftest import Sessions
from tests.db_faults import backend_pid, end_backend
from tests.sql_statements import recorded_statements

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
EVENT = uuid.UUID(int=1)
GROUP = uuid.UUID(int=2)
IDS = [uuid.UUID(int=100 + i) for i in range(4)]


async def plant(sessions: Sessions) -> None:
    """One event, one user, four due deliveries: two in a send group, one to a user who was erased."""
    async with sessions() as session, session.begin():
        await events.insert(
            session,
            row={
                "id": EVENT,
                "type": "approval.requested",
                "body_hash": "0" * 64,
                "organization_id": "org-1",
                "data": {"nested": {"list": [1, "two", None]}, "ünï": "cødé"},
                "recipients": ["u-1", "erased"],
                "send_at": NOW,
                "received_at": NOW,
            },
        )
        profile = {"id": "u-1", "organization_id": "org-1", "roles": ["manager"], "email": "m@example.com"}
        await users.upsert(session, profiles=[profile], now=NOW)
        await deliveries.insert(
            session,
            rows=[
                {
                    "id": IDS[i],
                    "event_id": EVENT,
                    "event_type": "approval.requested",
                    "user_id": "erased" if i == 3 else "u-1",
                    "channel": ("push", "email", "in_app", "email")[i],
                    "provider": "onesignal" if i == 0 else None,
                    "status": DeliveryStatus.queued,
                    "reason": None,
                    "not_before": NOW if i == 1 else None,
                    "digest_key": "d" if i == 2 else None,
                    "fallback_of": None,
                    "send_group": GROUP if i in (1, 2) else None,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i in range(4)
            ],
        )


def columns(instance: SQLModel) -> dict[str, tuple[Any, type]]:
    table = sa.inspect(type(instance)).local_table
    return {c.key: (getattr(instance, c.key), type(getattr(instance, c.key))) for c in table.c}


async def orm_loaded(sessions: Sessions) -> dict[Any, SQLModel]:
    async with sessions() as session:
        loaded: list[SQLModel] = [
            *(await session.execute(sa.select(Delivery))).scalars(),
            *(await session.execute(sa.select(Event))).scalars(),
            *(await session.execute(sa.select(User))).scalars(),
        ]
        return {(type(instance), instance.id): instance for instance in loaded}  # type: ignore[attr-defined]


def assert_as_loaded(instance: SQLModel, loaded: dict[Any, SQLModel]) -> None:
    assert columns(instance) == columns(loaded[(type(instance), instance.id)])  # type: ignore[attr-defined]
    state = sa.inspect(instance)
    assert state.detached
    assert not state.modified


async def test_claim_and_lock_reads_give_what_the_orm_loads(sessions: Sessions) -> None:
    await plant(sessions)
    loaded = await orm_loaded(sessions)
    async with sessions() as session, session.begin():
        claimed = await deliveries.claim_due(session, now=utcnow(), limit=1)
        rows = claimed.rows
        locked = await deliveries.lock_many(session, IDS)
        one = await deliveries.lock_unit(session, delivery_id=IDS[3])
        group = await deliveries.lock_unit(session, send_group=GROUP)
    assert sorted(d.id for d, _, _ in rows) in ([IDS[0]], [IDS[3]], IDS[1:3])  # one row, or its whole group
    assert [d.id for d, _, _ in group] == IDS[1:3]
    assert [user for _, _, user in one] == [None]  # erased
    for delivery, event, user in [*rows, *one, *group]:
        for instance in (delivery, event, user):
            if instance is not None:
                assert_as_loaded(instance, loaded)
    assert group[0][1].source == "api"  # the insert left it out: its Python default, as SQLAlchemy fills it
    assert group[0][1] is group[1][1]  # one event object for the rows of one event, as the ORM's identity map
    assert group[0][2] is group[1][2]
    assert sorted(locked) == IDS
    for delivery in locked.values():
        assert_as_loaded(delivery, loaded)


@pytest.mark.postgres_only
async def test_claim_and_lock_reads_run_on_the_driver(postgres_engine: AsyncEngine) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    with recorded_statements(postgres_engine) as statements:
        async with sessions() as session, session.begin():
            await deliveries.claim_due(session, now=utcnow(), limit=10)
            await deliveries.lock_unit(session, send_group=GROUP)
            await deliveries.lock_many(session, IDS)
    reads = [(s.sql.split()[0], s.on_driver) for s in statements]
    # the claim, the rest of its send groups, their due members' count; then the two locks
    assert reads == [("SELECT", True)] * 5


@pytest.mark.postgres_only
async def test_a_transaction_begun_by_a_read_on_the_driver_commits_and_rolls_back(postgres_engine: AsyncEngine) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    for commit in (False, True):
        async with sessions() as session:
            async with session.begin():
                locked = await deliveries.lock_many(session, IDS[:1])
                locked[IDS[0]].attempts = 7 if commit else 99
                await deliveries.write(session, list(locked.values()))
                if not commit:
                    await session.rollback()
            stored = await session.get(Delivery, IDS[0])
            assert stored is not None
            assert stored.attempts == (7 if commit else 0)


@pytest.mark.postgres_only
async def test_a_read_that_begins_on_a_lost_connection_invalidates_it(
    postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    # A pooled connection whose backend is gone (a server restart, pg_terminate_backend): the BEGIN the driver
    # sends fails as SQLAlchemy's error, and the connection is invalidated, so the pool never hands it out again.
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    async with sessions() as session:
        pid = await backend_pid(session)
    await end_backend(pid, postgres_url)
    with pytest.raises(sa.exc.DBAPIError) as raised:
        async with sessions() as session, session.begin():
            await deliveries.lock_many(session, IDS)
    assert raised.value.connection_invalidated
    assert db.unavailable(raised.value) == "the database connection was lost"
    async with sessions() as session, session.begin():  # a new connection
        assert sorted(await deliveries.lock_many(session, IDS)) == IDS


async def test_inbox_rows_are_stored_and_returned_as_the_orm_loads_them(sessions: Sessions) -> None:
    # On PostgreSQL one INSERT over arrays on the driver, JSON documents sent as text and cast to jsonb.
    documents = [{"nested": {"list": [1, 2.5, None, True]}, "ünï": "cødé ✓", "quote": "'\"{},"}, {}, {"n": 10**15}]
    rows = [
        {
            "user_id": f"user-{i}",
            "delivery_id": IDS[i],
            "event_id": EVENT if i else None,
            "event_type": "payment.received",
            "title": ("Paid", "NULL", "a,b")[i],
            "body": "body\nline",
            "data": documents[i],
            "action_url": None if i == 1 else "/payments/1",
        }
        for i in range(3)
    ]
    async with sessions() as session, session.begin():
        returned = await inbox.insert(session, rows=rows, now=NOW)
    async with sessions() as session:
        loaded = {m.delivery_id: m for m in (await session.execute(sa.select(InboxMessage))).scalars()}
    assert set(returned) == set(loaded) == set(IDS[:3])
    for delivery_id, message in returned.items():
        expected = columns(loaded[delivery_id])
        assert {name: getattr(message, name) for name in expected} == {name: v for name, (v, _) in expected.items()}
    assert [loaded[IDS[i]].data for i in range(3)] == documents
    assert loaded[IDS[0]].created_at == NOW


@pytest.mark.postgres_only
async def test_reads_of_a_list_are_one_statement_on_the_driver_whatever_its_length(
    postgres_engine: AsyncEngine,
) -> None:
    # An expanding IN rendered a statement text per length of its list, each prepared anew on every connection.
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    sent: list[list[tuple[str, bool]]] = []
    for count in (1, 3):
        with recorded_statements(postgres_engine) as statements:
            async with sessions() as session, session.begin():
                ids = ["u-1", "erased", "nobody"][:count]
                found = await users.recipients(session, user_ids=ids, event_organization_id="org-1")
                heads = await digests.open_heads(session, digest_keys=["d", "e", "f"][:count])
                head = (await deliveries.lock_many(session, [IDS[2]]))[IDS[2]]
                counted = await digests.counts(session, heads=[head] * count)
                read = await inbox.read_among(session, delivery_ids=IDS[:count])
        assert (sorted(found), heads, counted, read) == (["u-1"], {"d": IDS[2]}, {IDS[2]: 1}, set())
        sent.append([(s.sql, s.on_driver) for s in statements])
    assert sent[0] == sent[1]
    assert [on_driver for _, on_driver in sent[0]] == [True] * 5


@pytest.mark.postgres_only
async def test_the_driver_asks_the_session_for_its_connection_once_per_transaction(
    postgres_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Asking costs two greenlet switches per statement; within a transaction the connection cannot change.
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    async with sessions() as session:
        asked = 0
        connection = session.connection

        async def counted() -> Any:
            nonlocal asked
            asked += 1
            return await connection()

        monkeypatch.setattr(session, "connection", counted)
        for expected in (1, 2):  # each transaction of the session asks once, and sees its own writes
            async with session.begin():
                locked = await deliveries.lock_many(session, IDS[:1])
                locked[IDS[0]].attempts = expected
                await deliveries.write(session, list(locked.values()))
                assert (await deliveries.lock_many(session, IDS[:1]))[IDS[0]].attempts == expected
            assert asked == expected


@pytest.mark.postgres_only
async def test_a_connection_lost_inside_a_transaction_fails_its_next_statement_and_is_invalidated(
    postgres_engine: AsyncEngine, postgres_url: str
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    await plant(sessions)
    async with sessions() as session, session.begin():
        await deliveries.lock_many(session, IDS)
        await end_backend(await backend_pid(session), postgres_url)
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await deliveries.lock_many(session, IDS)
        await session.rollback()
    assert raised.value.connection_invalidated
    async with sessions() as session, session.begin():  # a new connection
        assert sorted(await deliveries.lock_many(session, IDS)) == IDS
