"""Read-only queries on deliveries for the API and the dashboard: listings by page, one delivery's history, the
backlog by status, whether anything is still pending. None of them locks or writes; the claim and write
queries are in ``notifier.db.deliveries``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from notifier.db.engine import snapshot
from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition
from notifier.types import PENDING_STATUSES


async def any_pending_before(session: AsyncSession, *, deadline: dt.datetime) -> bool:
    """Whether some delivery is still pending (queued, deferred or sending) with a due time before ``deadline``."""
    found = await session.execute(
        sa.select(col(Delivery.id))
        .where(
            col(Delivery.status).in_(sorted(PENDING_STATUSES)),
            sa.or_(col(Delivery.not_before).is_(None), col(Delivery.not_before) <= deadline),
        )
        .limit(1)
    )
    return found.first() is not None


async def backlog(session: AsyncSession) -> dict[str, int]:
    """How many deliveries are pending, by status (every pending status present, zero included)."""
    rows = await session.execute(
        sa.select(col(Delivery.status), sa.func.count())
        .where(col(Delivery.status).in_(sorted(PENDING_STATUSES)))
        .group_by(col(Delivery.status))
    )
    counts = {str(status): int(count) for status, count in rows}
    return {str(status): counts.get(str(status), 0) for status in sorted(PENDING_STATUSES)}


async def of_event(session: AsyncSession, *, event_id: uuid.UUID) -> list[Delivery]:
    """The deliveries of one event, by user and channel."""
    rows = await session.execute(
        sa.select(Delivery).where(col(Delivery.event_id) == event_id).order_by(Delivery.user_id, Delivery.channel)
    )
    return list(rows.scalars())


@dataclass(frozen=True)
class DeliveryFilters:
    """What a listing is narrowed to; every field is optional and they combine with AND."""

    user_id: str | None = None
    event_id: uuid.UUID | None = None
    status: str | None = None
    channel: str | None = None
    type: str | None = None
    since: dt.datetime | None = None


Cursor = tuple[dt.datetime, uuid.UUID]
"""Where a newest-first page continues: the (created_at, id) of the last row shown."""


def page_query(filters: DeliveryFilters, *, cursor: Cursor | None, limit: int) -> sa.Select[Delivery]:
    """Newest first, by (created_at, id); one row more than ``limit`` so the caller can tell a next page exists."""
    statement = sa.select(Delivery).order_by(col(Delivery.created_at).desc(), col(Delivery.id).desc()).limit(limit + 1)
    if filters.user_id is not None:
        statement = statement.where(col(Delivery.user_id) == filters.user_id)
    if filters.event_id is not None:
        statement = statement.where(col(Delivery.event_id) == filters.event_id)
    if filters.status is not None:
        statement = statement.where(col(Delivery.status) == filters.status)
    if filters.channel is not None:
        statement = statement.where(col(Delivery.channel) == filters.channel)
    if filters.type is not None:
        statement = statement.where(col(Delivery.event_type) == filters.type)
    if filters.since is not None:
        statement = statement.where(col(Delivery.created_at) >= filters.since)
    if cursor is not None:
        statement = statement.where(sa.tuple_(Delivery.created_at, Delivery.id) < sa.tuple_(*cursor))
    return statement


async def page(
    session: AsyncSession, *, filters: DeliveryFilters, cursor: Cursor | None, limit: int
) -> tuple[list[Delivery], Cursor | None]:
    """Return one page of deliveries and where the next page starts (None on the last)."""
    rows = list((await session.execute(page_query(filters, cursor=cursor, limit=limit))).scalars())
    shown = rows[:limit]
    return shown, (shown[-1].created_at, shown[-1].id) if len(rows) > limit else None


@dataclass(frozen=True)
class DeliveryHistory:
    """One delivery with its attempts (by number) and transitions (oldest first)."""

    delivery: Delivery
    attempts: list[DeliveryAttempt]
    transitions: list[DeliveryTransition]


async def with_history(session: AsyncSession, delivery_id: uuid.UUID) -> DeliveryHistory | None:
    """The delivery and its history, or None if it does not exist, all as of one moment: read in ``session``'s
    transaction, which this begins as a snapshot (``snapshot``) unless the caller's has begun already (then
    the caller holds what keeps them in step, e.g. the delivery's row lock)."""
    if not session.in_transaction():
        await snapshot(session)
    delivery = await session.get(Delivery, delivery_id)
    if delivery is None:
        return None
    attempts = await session.execute(
        sa.select(DeliveryAttempt)
        .where(col(DeliveryAttempt.delivery_id) == delivery_id)
        .order_by(col(DeliveryAttempt.number))
    )
    transitions = await session.execute(
        sa.select(DeliveryTransition)
        .where(col(DeliveryTransition.delivery_id) == delivery_id)
        .order_by(col(DeliveryTransition.at))
    )
    return DeliveryHistory(delivery, list(attempts.scalars()), list(transitions.scalars()))
