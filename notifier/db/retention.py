"""The retention purge: old events (with their deliveries), old read inbox messages, old preference history.

It runs from the cron route ``/v1/qstash/cron/retention`` (or ``notifier retention``) inside one HTTP
request, so it is bounded per call and reports whether work is left for the next run. It deletes in
batches of ids, each batch its own short transaction (the one place in db/ that owns transactions: a
purge is many of them), so no lock is held for long and a concurrent delivery attempt waits at most
one batch.

What the purge keeps, whatever its age: events that still have a pending (queued, deferred,
sending) delivery, unread inbox messages (an inbox message carries its own title and body and
has no foreign key to its event, so it survives its event), and the latest preference change of each
user and organization: it records who set the preferences in force and when, which stays true for as
long as they are in force. (Erasing a user erases their history, whatever its age.)
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from notifier.db.models import PREFERENCE_CHANGES, Delivery, Event, InboxMessage
from notifier.types import PENDING_STATUSES

RETENTION_BATCH = 1000
"""Ids per DELETE statement (and per transaction)."""
RETENTION_MAX_BATCHES = 50
"""Batches per table per call; what is left is reported as ``more`` and done by the next run."""
RETENTION_TIME_BUDGET = 20.0
"""Seconds after which no new batch is started (serverless functions have a maximum duration)."""


@dataclass(frozen=True)
class PurgeReport:
    """What one retention run deleted, and whether older rows are left for the next run."""

    cutoff: dt.datetime
    events: int
    deliveries: int
    inbox_messages: int
    preference_changes: int
    more: bool


def _has_pending_delivery() -> sa.Exists:
    return (
        sa.select(sa.literal(1))
        .where(col(Delivery.event_id) == col(Event.id), col(Delivery.status).in_(sorted(PENDING_STATUSES)))
        .exists()
    )


def _rowcount(result: sa.Result[Any]) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


async def _purge_event_batch(
    sessions: async_sessionmaker[AsyncSession], *, cutoff: dt.datetime, batch_size: int
) -> tuple[int, int, int]:
    """Delete one batch of expired events (deliveries, attempts, transitions cascade).

    Returns (ids selected, events deleted, deliveries deleted).
    """
    async with sessions() as session, session.begin():
        candidates = (
            sa.select(col(Event.id))
            .where(col(Event.received_at) < cutoff, ~_has_pending_delivery())
            .order_by(col(Event.received_at))
            .limit(batch_size)
        )
        ids = list((await session.execute(candidates)).scalars())
        if not ids:
            return 0, 0, 0
        deliveries = await session.scalar(
            sa.select(sa.func.count()).select_from(Delivery).where(col(Delivery.event_id).in_(ids))
        )
        # The pending check is repeated in the DELETE: a delivery may have been re-queued since the SELECT.
        deleted = await session.execute(
            sa.delete(Event)
            .where(col(Event.id).in_(ids), ~_has_pending_delivery())
            .execution_options(synchronize_session=False)
        )
        return len(ids), _rowcount(deleted), int(deliveries or 0)


async def _purge_inbox_batch(
    sessions: async_sessionmaker[AsyncSession], *, cutoff: dt.datetime, batch_size: int
) -> tuple[int, int]:
    """Delete one batch of read inbox messages created before ``cutoff``. Returns (selected, deleted)."""
    async with sessions() as session, session.begin():
        candidates = (
            sa.select(col(InboxMessage.id))
            .where(col(InboxMessage.created_at) < cutoff, col(InboxMessage.read_at).is_not(None))
            .order_by(col(InboxMessage.created_at))
            .limit(batch_size)
        )
        ids = list((await session.execute(candidates)).scalars())
        if not ids:
            return 0, 0
        deleted = await session.execute(
            sa.delete(InboxMessage)
            .where(col(InboxMessage.id).in_(ids), col(InboxMessage.read_at).is_not(None))
            .execution_options(synchronize_session=False)
        )
        return len(ids), _rowcount(deleted)


def _superseded() -> sa.Exists:
    """A later change of the same subject exists (history's order: changed_at, then id)."""
    later = PREFERENCE_CHANGES.alias("later")
    return (
        sa.select(sa.literal(1))
        .where(
            later.c.subject_kind == PREFERENCE_CHANGES.c.subject_kind,
            later.c.subject_id == PREFERENCE_CHANGES.c.subject_id,
            sa.tuple_(later.c.changed_at, later.c.id)
            > sa.tuple_(PREFERENCE_CHANGES.c.changed_at, PREFERENCE_CHANGES.c.id),
        )
        .exists()
    )


async def _purge_preference_change_batch(
    sessions: async_sessionmaker[AsyncSession], *, cutoff: dt.datetime, batch_size: int
) -> tuple[int, int]:
    """Delete one batch of preference changes made before ``cutoff`` that a later change of the same subject
    superseded. Returns (selected, deleted)."""
    table = PREFERENCE_CHANGES
    async with sessions() as session, session.begin():
        candidates = (
            sa.select(table.c.id)
            .where(table.c.changed_at < cutoff, _superseded())
            .order_by(table.c.changed_at)
            .limit(batch_size)
        )
        ids = list((await session.execute(candidates)).scalars())
        if not ids:
            return 0, 0
        deleted = await session.execute(sa.delete(table).where(table.c.id.in_(ids)))
        return len(ids), _rowcount(deleted)


async def purge_expired(
    *,
    sessions: async_sessionmaker[AsyncSession],
    cutoff: dt.datetime,
    batch_size: int = RETENTION_BATCH,
    max_batches: int = RETENTION_MAX_BATCHES,
    time_budget: float = RETENTION_TIME_BUDGET,
) -> PurgeReport:
    """Delete events received, read inbox messages created and superseded preference changes made before
    ``cutoff``; return the counts.

    At most ``max_batches`` batches per table, none started after ``time_budget`` seconds;
    ``more`` says the last batch was full (or the budget ran out), so older rows may be left.
    """
    if batch_size < 1 or max_batches < 1:
        raise ValueError(f"batch_size and max_batches must be positive, got {batch_size} and {max_batches}")
    deadline = time.monotonic() + time_budget
    events = deliveries = inbox = 0
    more = False
    for _ in range(max_batches):
        selected, deleted, cascaded = await _purge_event_batch(sessions, cutoff=cutoff, batch_size=batch_size)
        events, deliveries = events + deleted, deliveries + cascaded
        more = selected == batch_size
        if not more or time.monotonic() > deadline:
            break
    events_more = more
    for _ in range(max_batches):
        selected, deleted = await _purge_inbox_batch(sessions, cutoff=cutoff, batch_size=batch_size)
        inbox += deleted
        more = selected == batch_size
        if not more or time.monotonic() > deadline:
            break
    inbox_more, changes = more, 0
    for _ in range(max_batches):
        selected, deleted = await _purge_preference_change_batch(sessions, cutoff=cutoff, batch_size=batch_size)
        changes += deleted
        more = selected == batch_size
        if not more or time.monotonic() > deadline:
            break
    return PurgeReport(cutoff, events, deliveries, inbox, changes, more or events_more or inbox_more)
