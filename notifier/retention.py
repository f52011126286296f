"""Housekeeping over the tables: the retention purge and the stuck-delivery query of the sweep.

Both run from cron routes (``/v1/qstash/cron/retention`` and ``/v1/qstash/cron/sweep``) inside one
HTTP request, so both are bounded per call and report whether work is left for the next run.
The purge deletes in batches of ids, each batch its own short transaction, so no lock is held for
long and a concurrent delivery attempt waits at most one batch.

What the purge keeps, whatever its age: events that still have a pending (queued, deferred,
sending) delivery, and unread inbox messages (an inbox message carries its own title and body and
has no foreign key to its event, so it survives its event).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from notifier.models import Delivery, Event, InboxMessage
from notifier.types import PENDING_STATUSES, DeliveryStatus

RETENTION_BATCH = 1000
"""Ids per DELETE statement (and per transaction)."""
RETENTION_MAX_BATCHES = 50
"""Batches per table per call; what is left is reported as ``more`` and done by the next run."""
RETENTION_TIME_BUDGET = 20.0
"""Seconds after which no new batch is started (serverless functions have a maximum duration)."""
SWEEP_LIMIT = 500
"""Deliveries re-dispatched per sweep call."""
SWEEP_GRACE = dt.timedelta(seconds=30)
"""How long a pending row must have been due before the sweep calls it stuck.

Rows being published right now (fresh, ``not_before`` NULL) and rows QStash is about to deliver at
their ``not_before`` (deferred sends, retries steered by ``Retry-After``) are not doubled.
"""


@dataclass(frozen=True)
class PurgeReport:
    """What one retention run deleted, and whether older rows are left for the next run."""

    cutoff: dt.datetime
    events: int
    deliveries: int
    inbox_messages: int
    more: bool

    def public(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "events_deleted": self.events,
            "deliveries_deleted": self.deliveries,
            "inbox_messages_deleted": self.inbox_messages,
            "more": self.more,
        }


@dataclass(frozen=True)
class StuckDelivery:
    id: uuid.UUID
    status: str


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


async def purge_expired(
    *,
    sessions: async_sessionmaker[AsyncSession],
    cutoff: dt.datetime,
    batch_size: int = RETENTION_BATCH,
    max_batches: int = RETENTION_MAX_BATCHES,
    time_budget: float = RETENTION_TIME_BUDGET,
) -> PurgeReport:
    """Delete events received and read inbox messages created before ``cutoff``; return the counts.

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
    return PurgeReport(cutoff, events, deliveries, inbox, more or events_more)


def stuck_condition(now: dt.datetime, grace: dt.timedelta = SWEEP_GRACE) -> sa.ColumnElement[bool]:
    """Rows the sweep re-dispatches: pending and due for at least ``grace``, or ``sending`` with an expired lease."""
    due_since = sa.func.coalesce(col(Delivery.not_before), col(Delivery.updated_at))
    pending = sa.and_(
        col(Delivery.status).in_([DeliveryStatus.queued, DeliveryStatus.deferred]),
        due_since <= now - grace,
        sa.or_(col(Delivery.claimed_until).is_(None), col(Delivery.claimed_until) < now),
    )
    abandoned = sa.and_(col(Delivery.status) == DeliveryStatus.sending, col(Delivery.claimed_until) < now)
    return sa.or_(pending, abandoned)


async def find_stuck_deliveries(
    *,
    sessions: async_sessionmaker[AsyncSession],
    now: dt.datetime,
    grace: dt.timedelta = SWEEP_GRACE,
    limit: int = SWEEP_LIMIT,
) -> list[StuckDelivery]:
    """Up to ``limit`` stuck deliveries (see ``stuck_condition``), longest overdue first. Reads only."""
    due_since = sa.func.coalesce(col(Delivery.not_before), col(Delivery.updated_at))
    statement = (
        sa.select(col(Delivery.id), col(Delivery.status))
        .where(stuck_condition(now, grace))
        .order_by(due_since, col(Delivery.id))
        .limit(limit)
    )
    async with sessions() as session:
        rows = (await session.execute(statement)).all()
    return [StuckDelivery(delivery_id, status) for delivery_id, status in rows]
