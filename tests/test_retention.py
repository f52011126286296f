"""notifier.retention on SQLite and PostgreSQL: what the purge deletes and keeps, in batches; what the sweep finds."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.api.callbacks import SWEEP_GRACE, SWEEP_LIMIT, purge_public
from notifier.db import deliveries
from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition, Event, InboxMessage, PreferenceChange
from notifier.db.retention import purge_expired
from notifier.types import utcnow
from tests.conftest import Sessions

NOW = utcnow()
OLD = NOW - dt.timedelta(days=100)
CUTOFF = NOW - dt.timedelta(days=90)


async def add_event(
    sessions: Sessions, *, received_at: dt.datetime, statuses: tuple[str, ...] = ("sent",)
) -> uuid.UUID:
    """An event with one delivery per status (each with an attempt and a transition)."""
    event = Event(type="booking.confirmed", body_hash="0" * 64, received_at=received_at)
    async with sessions() as session, session.begin():
        session.add(event)
        await session.flush()
        for index, status in enumerate(statuses):
            delivery = Delivery(
                event_id=event.id, event_type=event.type, user_id=f"user-{index}", channel="in_app", status=status
            )
            session.add(delivery)
            await session.flush()
            session.add(DeliveryAttempt(delivery_id=delivery.id, number=1, outcome="sent"))
            session.add(DeliveryTransition(delivery_id=delivery.id, from_status=None, to_status=status))
    return event.id


async def add_inbox(sessions: Sessions, *, created_at: dt.datetime, read: bool, archived: bool = False) -> uuid.UUID:
    message = InboxMessage(
        user_id="user-1",
        event_type="booking.confirmed",
        title="t",
        body="b",
        created_at=created_at,
        read_at=created_at if read else None,
        archived_at=created_at if archived else None,
    )
    async with sessions() as session, session.begin():
        session.add(message)
    return message.id


async def count(sessions: Sessions, table: Any) -> int:
    async with sessions() as session:
        return int((await session.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def test_the_purge_deletes_expired_events_in_bounded_batches(sessions: Sessions) -> None:
    for _ in range(5):
        await add_event(sessions, received_at=OLD, statuses=("sent", "failed"))
    recent = await add_event(sessions, received_at=NOW)

    first = await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=2, max_batches=2)
    second = await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=2, max_batches=2)
    third = await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=2, max_batches=2)

    assert [(r.events, r.deliveries, r.more) for r in (first, second, third)] == [
        (4, 8, True),
        (1, 2, False),
        (0, 0, False),
    ]
    async with sessions() as session:
        assert list((await session.execute(sa.select(col(Event.id)))).scalars()) == [recent]
    # deliveries, attempts and transitions went with their events
    assert [await count(sessions, t) for t in (Delivery, DeliveryAttempt, DeliveryTransition)] == [1, 1, 1]


@pytest.mark.parametrize(
    ("status", "kept"),
    [
        ("queued", True),
        ("deferred", True),
        ("sending", True),
        ("sent", False),
        ("failed", False),
        ("suppressed", False),
        ("read", False),
    ],
)
async def test_an_event_with_a_pending_delivery_outlives_the_retention(
    sessions: Sessions, status: str, kept: bool
) -> None:
    await add_event(sessions, received_at=OLD, statuses=("sent", status))

    report = await purge_expired(sessions=sessions, cutoff=CUTOFF)

    assert (report.events, await count(sessions, Event)) == ((0, 1) if kept else (1, 0))


async def test_the_purge_deletes_read_inbox_messages_only(sessions: Sessions) -> None:
    old_read = [await add_inbox(sessions, created_at=OLD, read=True) for _ in range(3)]
    keep = {
        await add_inbox(sessions, created_at=OLD, read=False),
        await add_inbox(sessions, created_at=OLD, read=False, archived=True),
        await add_inbox(sessions, created_at=NOW, read=True),
    }

    first = await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=2, max_batches=1)
    second = await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=2, max_batches=1)

    assert [(r.inbox_messages, r.more) for r in (first, second)] == [(2, True), (1, False)]
    async with sessions() as session:
        left = set((await session.execute(sa.select(col(InboxMessage.id)))).scalars())
    assert left == keep
    assert not left & set(old_read)


async def add_change(sessions: Sessions, kind: str, subject: str, version: int, changed_at: dt.datetime) -> uuid.UUID:
    change = PreferenceChange(
        subject_kind=kind, subject_id=subject, changed_by="service", new_document={}, version=version
    )
    change.changed_at = changed_at
    async with sessions() as session, session.begin():
        session.add(change)
    return change.id


async def test_the_purge_deletes_superseded_preference_history_and_keeps_each_latest_change(
    sessions: Sessions,
) -> None:
    hour = dt.timedelta(hours=1)
    superseded = [
        await add_change(sessions, "user", "u-1", 1, OLD),
        await add_change(sessions, "user", "u-1", 2, OLD + hour),
        await add_change(sessions, "user", "u-2", 1, OLD),
        await add_change(sessions, "organization", "u-1", 1, OLD),
    ]
    keep = {
        await add_change(sessions, "user", "u-1", 3, OLD + 2 * hour),  # old, but the preferences in force
        await add_change(sessions, "user", "u-2", 2, NOW),  # recent
        await add_change(sessions, "organization", "u-1", 2, OLD + hour),  # another subject with the same id
        await add_change(sessions, "user", "u-3", 1, OLD),  # the only change of u-3
        await add_change(sessions, "user", "u-4", 1, NOW - hour),  # recent and superseded: kept until it is old
        await add_change(sessions, "user", "u-4", 2, NOW),
    }

    first = await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=3, max_batches=1)
    second = await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=3, max_batches=1)

    assert [(r.preference_changes, r.more) for r in (first, second)] == [(3, True), (1, False)]
    assert purge_public(first)["preference_changes_deleted"] == 3
    async with sessions() as session:
        left = set((await session.execute(sa.select(col(PreferenceChange.id)))).scalars())
    assert left == keep
    assert not left & set(superseded)


async def test_the_purge_refuses_an_unbounded_call(sessions: Sessions) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        await purge_expired(sessions=sessions, cutoff=CUTOFF, batch_size=0)


S = dt.timedelta(seconds=1)
# status, not_before (offset from now), updated_at (offset), claimed_until (offset), stuck?
STUCK_TABLE = [
    ("queued", None, -SWEEP_GRACE - S, None, True),  # publishing failed a while ago
    ("queued", None, -SWEEP_GRACE + 5 * S, None, False),  # being published right now
    ("queued", -SWEEP_GRACE - S, -dt.timedelta(hours=1), None, True),  # a retry QStash never came back for
    ("queued", -5 * S, -dt.timedelta(hours=1), None, False),  # a retry QStash is about to deliver
    ("deferred", dt.timedelta(hours=8), -dt.timedelta(hours=1), None, False),  # quiet hours, not due
    ("deferred", -dt.timedelta(minutes=2), -dt.timedelta(hours=9), None, True),  # due two minutes ago
    ("sending", None, -dt.timedelta(minutes=3), -S, True),  # its attempt died; the lease ran out
    ("sending", None, -dt.timedelta(minutes=2), 30 * S, False),  # being attempted now
    ("sent", None, -dt.timedelta(hours=1), None, False),
    ("failed", -dt.timedelta(hours=1), -dt.timedelta(hours=1), None, False),
]


async def test_the_sweep_finds_rows_overdue_past_the_grace_and_expired_leases(sessions: Sessions) -> None:
    event_id = await add_event(sessions, received_at=NOW, statuses=())
    expected = []
    async with sessions() as session, session.begin():
        for index, (status, not_before, updated, claimed, stuck) in enumerate(STUCK_TABLE):
            row = Delivery(
                event_id=event_id,
                event_type="booking.confirmed",
                user_id=f"user-{index}",
                channel="push",
                status=status,
                not_before=NOW + not_before if not_before is not None else None,
                updated_at=NOW + updated,
                claimed_until=NOW + claimed if claimed is not None else None,
            )
            session.add(row)
            if stuck:
                expected.append((row.user_id, status))

    async with sessions() as session:
        found = await deliveries.find_stuck(session, now=NOW, grace=SWEEP_GRACE, limit=SWEEP_LIMIT)
        limited = await deliveries.find_stuck(session, now=NOW, grace=SWEEP_GRACE, limit=2)

    async with sessions() as session:
        users = dict((await session.execute(sa.select(col(Delivery.id), col(Delivery.user_id)))).all())
    assert sorted((users[row.id], row.status) for row in found) == sorted(expected)
    # longest overdue first (by not_before, else by the last change): the dead attempt, then the deferred row
    assert [users[row.id] for row in limited] == ["user-6", "user-5"]
