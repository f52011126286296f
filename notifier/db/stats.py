"""Read-only figures for the dashboard: per-channel outcomes and latency, recent events with status counts.

Portable SQL (SQLite and PostgreSQL): counts are grouped in the database, the percentile is taken in
Python over the window's attempt durations.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from notifier.db.models import Delivery, DeliveryAttempt, Event
from notifier.types import ALL_CHANNELS, DeliveryStatus

WINDOW = dt.timedelta(hours=24)
# Attempts are reached through their deliveries (created_at is indexed). An attempt in the window belongs
# to a delivery created at most a day before it under every retry schedule (backoff is capped at a day);
# only a send_at or quiet-hours deferral longer than that falls outside.
ATTEMPT_LOOKBACK = dt.timedelta(days=1)
OUTCOMES = ("sent", "failed", "suppressed")


@dataclass(frozen=True)
class ChannelStats:
    """One channel over the window: outcomes of the deliveries created in it, and attempt latency."""

    channel: str
    sent: int  # including in-app messages already read
    failed: int
    suppressed: int
    p95_ms: float | None
    measured: int  # finished attempts the p95 is computed over


def p95(values: list[float]) -> float | None:
    """Return the 95th percentile by nearest rank (a value that occurred), or None for no values."""
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1] if ordered else None


async def channel_stats(session: AsyncSession, *, now: dt.datetime) -> list[ChannelStats]:
    """Return one ``ChannelStats`` per channel for the 24 hours before ``now``."""
    since = now - WINDOW
    counts: dict[tuple[str, str], int] = defaultdict(int)
    by_status = await session.execute(
        sa.select(col(Delivery.channel), col(Delivery.status), sa.func.count())
        .where(col(Delivery.created_at) >= since)
        .group_by(col(Delivery.channel), col(Delivery.status))
    )
    for channel, status, count in by_status:
        counts[(channel, "sent" if status == DeliveryStatus.read else status)] += count
    durations: dict[str, list[float]] = defaultdict(list)
    attempts = await session.execute(
        sa.select(col(Delivery.channel), col(DeliveryAttempt.started_at), col(DeliveryAttempt.finished_at))
        .join(Delivery, col(Delivery.id) == col(DeliveryAttempt.delivery_id))
        .where(
            col(Delivery.created_at) >= since - ATTEMPT_LOOKBACK,
            col(DeliveryAttempt.started_at) >= since,
            col(DeliveryAttempt.finished_at).is_not(None),
            col(DeliveryAttempt.outcome) != "interrupted",
        )
    )
    for channel, started, finished in attempts:
        if finished is not None:
            durations[channel].append((finished - started).total_seconds() * 1000)
    return [
        ChannelStats(
            channel=str(channel),
            sent=counts[(channel, "sent")],
            failed=counts[(channel, "failed")],
            suppressed=counts[(channel, "suppressed")],
            p95_ms=p95(durations[channel]),
            measured=len(durations[channel]),
        )
        for channel in ALL_CHANNELS
    ]


@dataclass(frozen=True)
class EventSummary:
    id: str
    type: str
    received_at: str
    recipients: int
    counts: list[tuple[str, int]]  # (status, deliveries) in status order, statuses with none left out


async def recent_events(session: AsyncSession, *, limit: int) -> list[EventSummary]:
    """Return the newest ``limit`` events with their delivery counts by status."""
    statement = sa.select(Event).order_by(col(Event.received_at).desc(), col(Event.id).desc()).limit(limit)
    events = list((await session.execute(statement)).scalars())
    counts: dict[uuid.UUID, dict[str, int]] = defaultdict(dict)
    if events:
        rows = await session.execute(
            sa.select(col(Delivery.event_id), col(Delivery.status), sa.func.count())
            .where(col(Delivery.event_id).in_([e.id for e in events]))
            .group_by(col(Delivery.event_id), col(Delivery.status))
        )
        for event_id, status, count in rows:
            counts[event_id][status] = count
    return [
        EventSummary(
            id=str(e.id),
            type=e.type,
            received_at=e.received_at.isoformat(),
            recipients=len(e.recipients),
            counts=[(str(s), counts[e.id][s]) for s in DeliveryStatus if s in counts[e.id]],
        )
        for e in events
    ]
