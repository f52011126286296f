"""The stored inbox behind the in-app channel: writing messages, and the one shape an inbox message has for
the API and for its realtime announcement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier.batching import GroupCommit
from notifier.channels.base import Message
from notifier.db import driver, inbox
from notifier.types import utcnow


def inbox_item(item: Any) -> dict[str, Any]:
    """An inbox message as the API and Ably show it, from an ``InboxMessage`` or a row of ``inbox_messages``."""
    return {
        "id": str(item.id),
        "user_id": item.user_id,
        "event_id": str(item.event_id) if item.event_id else None,
        "delivery_id": str(item.delivery_id) if item.delivery_id else None,
        "type": item.event_type,
        "title": item.title,
        "body": item.body,
        "data": item.data,
        "action_url": item.action_url,
        "created_at": item.created_at.isoformat(),
        "seen_at": item.seen_at.isoformat() if item.seen_at else None,
        "read_at": item.read_at.isoformat() if item.read_at else None,
        "archived_at": item.archived_at.isoformat() if item.archived_at else None,
    }


class DatabaseInboxStore:
    """Implements ``channels.base.InboxStore`` over the inbox_messages table (idempotent per delivery).

    Concurrent stores share one transaction (``GroupCommit``): under load the in-app deliveries of
    many workers land in one INSERT instead of a transaction each. That INSERT is the whole transaction, so on
    PostgreSQL it is sent without BEGIN and COMMIT, and without a session (``driver.alone``).
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._writes = GroupCommit(self._store_many, linger=0.002)

    async def store(self, message: Message) -> Mapping[str, Any]:
        return await self._writes.submit(message)

    async def _store_many(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        rows = [
            {
                "user_id": message.recipient.id,
                "delivery_id": message.delivery_id,
                "event_id": message.event_id,
                "event_type": message.event_type,
                "title": message.title,
                "body": message.body,
                "data": dict(message.data),
                "action_url": message.action_url,
            }
            for message in messages
        ]
        async with driver.alone(self._sessions) as connection:
            if connection is not None:  # PostgreSQL
                stored = await inbox.insert(connection, rows=rows, now=utcnow())
            else:
                async with self._sessions() as session, session.begin():
                    stored = await inbox.insert(session, rows=rows, now=utcnow())
        return [inbox_item(stored[message.delivery_id]) for message in messages]
