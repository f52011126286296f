"""Queries on inbox messages (the in-app channel's store). None of them commits."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from notifier.db import bulk, driver
from notifier.db.loading import Loader
from notifier.db.models import INBOX_MESSAGES, InboxMessage
from notifier.db.sql import dialect_insert

Cursor = tuple[dt.datetime, uuid.UUID]
ReadFilter = Literal["unread", "read", "all"]
ArchivedFilter = Literal["true", "false", "all"]

_M = INBOX_MESSAGES.c


def _unread(user_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(_M.user_id == user_id, _M.read_at.is_(None), _M.archived_at.is_(None))


# Stored by the in-app channel, one statement per group commit of concurrent attempts; on PostgreSQL over arrays
# on the driver (``notifier.db.bulk``, ``notifier.db.driver``): a multi-row VALUES statement built and compiled
# per call, through the session, cost 780 us of CPU for one row and 1,230 for four (bench/README.md).
_STORED_COLUMNS = (
    *("id", "user_id", "delivery_id", "event_id", "event_type"),
    *("title", "body", "data", "action_url", "created_at"),
)
_PG_INSERT = driver.Prepared(
    bulk.insert_select(INBOX_MESSAGES, _STORED_COLUMNS)
    .on_conflict_do_nothing(index_elements=["delivery_id"])
    .returning(*INBOX_MESSAGES.c)
)
_MESSAGE = Loader(InboxMessage)
_STORED_AMONG = driver.Prepared.both(
    lambda arrays: sa.select(*INBOX_MESSAGES.c).where(driver.member(_M.delivery_id, "ids", arrays=arrays))
)
_READ_AMONG = driver.Prepared.both(
    lambda arrays: sa.select(_M.delivery_id).where(
        driver.member(_M.delivery_id, "ids", arrays=arrays), _M.read_at.is_not(None)
    )
)


async def insert(
    session: driver.Target, *, rows: Sequence[Mapping[str, Any]], now: dt.datetime
) -> dict[uuid.UUID, Any]:
    """Store inbox messages once per delivery id; return the stored rows by delivery id (the earlier one on a repeat).

    One INSERT ... RETURNING for any number of rows, in delivery id order so concurrent batches lock
    alike; a SELECT only for deliveries whose message was stored before (a repeated attempt). On a ``Lent``
    connection from ``driver.alone`` the INSERT commits by itself, and so does the SELECT after it.
    """
    ordered = sorted(
        ({"id": uuid.uuid4(), "created_at": now, **row} for row in rows), key=lambda row: str(row["delivery_id"])
    )
    inserted: Iterable[Any]  # InboxMessage objects on PostgreSQL, rows elsewhere: the same attributes
    if (plain := bulk.without_arrays(session, ordered)) is None:
        arrays = bulk.array_values(INBOX_MESSAGES, _STORED_COLUMNS, ordered)
        inserted = map(_MESSAGE.load, await driver.fetch(session, _PG_INSERT, arrays))
    else:
        statement = (
            dialect_insert(plain, INBOX_MESSAGES)
            .values(ordered)
            .on_conflict_do_nothing(index_elements=["delivery_id"])
            .returning(*INBOX_MESSAGES.c)
        )
        inserted = await plain.execute(statement)
    stored = {message.delivery_id: message for message in inserted}
    if repeats := [row["delivery_id"] for row in ordered if row["delivery_id"] not in stored]:
        earlier = map(_MESSAGE.load, await driver.fetch(session, _STORED_AMONG, {"ids": repeats}))
        stored.update((message.delivery_id, message) for message in earlier)
    return stored


async def page(
    session: AsyncSession,
    *,
    user_id: str,
    read: ReadFilter,
    archived: ArchivedFilter,
    cursor: Cursor | None,
    limit: int,
) -> tuple[list[InboxMessage], Cursor | None]:
    """A user's messages newest first, narrowed by read state and archiving; and where the next page starts."""
    statement = (
        sa.select(InboxMessage)
        .where(_M.user_id == user_id)
        .order_by(_M.created_at.desc(), _M.id.desc())
        .limit(limit + 1)
    )
    if read == "unread":
        statement = statement.where(_M.read_at.is_(None))
    elif read == "read":
        statement = statement.where(_M.read_at.is_not(None))
    if archived == "false":
        statement = statement.where(_M.archived_at.is_(None))
    elif archived == "true":
        statement = statement.where(_M.archived_at.is_not(None))
    if cursor is not None:
        statement = statement.where(sa.tuple_(_M.created_at, _M.id) < sa.tuple_(*cursor))
    items = list((await session.execute(statement)).scalars())
    shown = items[:limit]
    return shown, (shown[-1].created_at, shown[-1].id) if len(items) > limit else None


async def unread_count(session: AsyncSession, *, user_id: str) -> int:
    """How many of the user's messages are neither read nor archived."""
    result = await session.execute(sa.select(sa.func.count()).select_from(INBOX_MESSAGES).where(_unread(user_id)))
    return int(result.scalar_one())


async def lock(session: AsyncSession, *, message_id: uuid.UUID) -> InboxMessage | None:
    """Lock one message for a change (flushed with the session's transaction), or None if it does not exist."""
    return await session.get(InboxMessage, message_id, with_for_update=True)


async def lock_unread(session: AsyncSession, *, user_id: str) -> list[InboxMessage]:
    """Lock the user's unread, unarchived messages for a change (flushed with the session's transaction)."""
    rows = await session.execute(sa.select(InboxMessage).where(_unread(user_id)).with_for_update())
    return list(rows.scalars())


async def read_among(session: AsyncSession, *, delivery_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """The deliveries among ``delivery_ids`` whose inbox message is marked read."""
    if not delivery_ids:
        return set()
    return {row[0] for row in await driver.fetch(session, _READ_AMONG, {"ids": list(delivery_ids)})}
