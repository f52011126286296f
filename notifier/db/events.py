"""Queries on events. None of them commits."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from notifier.db import driver
from notifier.db.models import DELIVERIES, EVENTS, Event
from notifier.db.sql import every_column, with_defaults

Cursor = tuple[dt.datetime, uuid.UUID]
"""Where a newest-first page continues: the (received_at, id) of the last event shown."""


def _insert_statement(dialect: str) -> Any:
    statement = every_column(dialect, EVENTS)
    return statement.on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(EVENTS.c.id)


_INSERT = driver.Prepared(_insert_statement("postgresql"), portable=_insert_statement("sqlite"))


_BY_KEY = driver.Prepared(
    sa.select(
        EVENTS.c.id,
        EVENTS.c.body_hash,
        DELIVERIES.c.id.label("delivery_id"),
        DELIVERIES.c.user_id,
        DELIVERIES.c.channel,
        DELIVERIES.c.status,
        DELIVERIES.c.reason,
        DELIVERIES.c.not_before,
        DELIVERIES.c.attempts,
        DELIVERIES.c.send_group,
        DELIVERIES.c.dispatch_generation,
    )
    .select_from(EVENTS.outerjoin(DELIVERIES, DELIVERIES.c.event_id == EVENTS.c.id))
    .where(EVENTS.c.idempotency_key == sa.bindparam("key"))
    .order_by(DELIVERIES.c.user_id, DELIVERIES.c.channel)
)


@dataclass(frozen=True)
class EventDelivery:
    """A delivery of an event as its producer sees it (and whether it has been attempted yet)."""

    id: uuid.UUID
    user_id: str
    channel: str
    status: str
    reason: str | None
    not_before: dt.datetime | None
    attempts: int
    send_group: uuid.UUID | None = None
    generation: int = 0


@dataclass(frozen=True)
class StoredEvent:
    """The event that holds an idempotency key: its id, the hash of its body, and its deliveries."""

    id: uuid.UUID
    body_hash: str
    deliveries: list[EventDelivery]


async def insert(session: driver.Target, *, row: Mapping[str, Any]) -> bool:
    """Insert an event; return False, inserting nothing, when its idempotency key is already taken.

    The unique constraint decides: of concurrent requests with one key, the later ones wait for the
    first to commit, then find the key taken.
    """
    return bool(await driver.fetch(session, _INSERT, with_defaults(EVENTS, row)))


async def by_key(session: driver.Target, *, key: str) -> StoredEvent | None:
    """The event stored under idempotency ``key`` with its deliveries (by user and channel), or None."""
    rows = await driver.fetch(session, _BY_KEY, {"key": key})
    if not rows:
        return None
    # Each row: the event's id and body hash, then one of its deliveries (all None for an event without any).
    deliveries = [EventDelivery(*row[2:]) for row in rows if row[2] is not None]
    return StoredEvent(rows[0][0], rows[0][1], deliveries)


async def get(session: AsyncSession, event_id: uuid.UUID) -> Event | None:
    return await session.get(Event, event_id)


async def page(
    session: AsyncSession, *, type: str | None, since: dt.datetime | None, cursor: Cursor | None, limit: int
) -> tuple[list[Event], Cursor | None]:
    """Events newest first (received_at, id), narrowed by ``type`` and ``since``; and where the next page starts."""
    statement = sa.select(Event).order_by(col(Event.received_at).desc(), col(Event.id).desc()).limit(limit + 1)
    if type:
        statement = statement.where(col(Event.type) == type)
    if since is not None:
        statement = statement.where(col(Event.received_at) >= since)
    if cursor is not None:
        statement = statement.where(sa.tuple_(col(Event.received_at), col(Event.id)) < sa.tuple_(*cursor))
    events = list((await session.execute(statement)).scalars())
    shown = events[:limit]
    return shown, (shown[-1].received_at, shown[-1].id) if len(events) > limit else None
