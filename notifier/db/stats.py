"""Read-only figures for the dashboard: per-channel outcomes and latency, recent events with status counts.

Everything is aggregated in the database, which returns one row per channel (and status): the p95 latency is
the nearest-rank percentile of the window's attempt durations, taken with ``percentile_disc`` on PostgreSQL
and with ``row_number()`` over the ordered durations on SQLite (which has no percentile function). Both pick
the value ``p95`` below would pick, exactly: durations are whole microseconds on both.
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
from notifier.db.sql import dialect_of
from notifier.types import ALL_CHANNELS, DeliveryStatus

WINDOW = dt.timedelta(hours=24)
# Attempts are reached through their deliveries (created_at is indexed). An attempt in the window belongs
# to a delivery created at most a day before it under every retry schedule (backoff is capped at a day);
# only a send_at or quiet-hours deferral longer than that falls outside.
ATTEMPT_LOOKBACK = dt.timedelta(days=1)
OUTCOMES = ("sent", "failed", "suppressed")
P95 = 0.95


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
    """Return the 95th percentile by nearest rank (a value that occurred), or None for no values.

    The definition ``channel_stats`` computes in SQL: the value at (1-based) rank ceil(0.95 n) of the n sorted.
    """
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1] if ordered else None


def _duration_us(dialect: str) -> sa.ColumnElement[int]:
    """An attempt's duration in whole microseconds, computed by the database."""
    started, finished = col(DeliveryAttempt.started_at), col(DeliveryAttempt.finished_at)
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", finished - started) * 1_000_000, sa.BigInteger)
    # SQLite keeps a timestamp as text, 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC): whole seconds from strftime, and the
    # microseconds from the text, so nothing passes through julianday's floating point.
    seconds = sa.cast(sa.func.strftime("%s", finished), sa.BigInteger) - sa.cast(
        sa.func.strftime("%s", started), sa.BigInteger
    )
    micros = sa.cast(sa.func.substr(finished, 21, 6), sa.BigInteger) - sa.cast(
        sa.func.substr(started, 21, 6), sa.BigInteger
    )
    return seconds * 1_000_000 + micros


async def _latency(session: AsyncSession, *, since: dt.datetime) -> dict[str, tuple[float, int]]:
    """Per channel: the p95 of the finished attempts started since ``since`` (ms), and how many there were."""
    dialect = dialect_of(session)
    durations = (
        sa.select(col(Delivery.channel).label("channel"), _duration_us(dialect).label("us"))
        .join(Delivery, col(Delivery.id) == col(DeliveryAttempt.delivery_id))
        .where(
            col(Delivery.created_at) >= since - ATTEMPT_LOOKBACK,
            col(DeliveryAttempt.started_at) >= since,
            col(DeliveryAttempt.finished_at).is_not(None),
            col(DeliveryAttempt.outcome) != "interrupted",
        )
        .subquery()
    )
    if dialect == "postgresql":
        statement = sa.select(
            durations.c.channel,
            sa.func.percentile_disc(P95).within_group(durations.c.us),
            sa.func.count(),
        ).group_by(durations.c.channel)
    else:
        ranked = sa.select(
            durations.c.channel,
            durations.c.us,
            sa.func.row_number().over(partition_by=durations.c.channel, order_by=durations.c.us).label("rank"),
            sa.func.count().over(partition_by=durations.c.channel).label("n"),
        ).subquery()
        # ceil(0.95 n) = ceil(19 n / 20), in integers
        statement = sa.select(ranked.c.channel, ranked.c.us, ranked.c.n).where(
            ranked.c.rank == (19 * ranked.c.n + 19) // 20
        )
    return {str(channel): (int(us) / 1000, int(n)) for channel, us, n in await session.execute(statement)}


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
    latency = await _latency(session, since=since)
    return [
        ChannelStats(
            channel=str(channel),
            sent=counts[(channel, "sent")],
            failed=counts[(channel, "failed")],
            suppressed=counts[(channel, "suppressed")],
            p95_ms=latency[channel][0] if channel in latency else None,
            measured=latency[channel][1] if channel in latency else 0,
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
