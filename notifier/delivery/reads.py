"""A reader's changes to their inbox (read, unread, archive, read all), with the in-app delivery kept in step:
a message read moves its delivery ``sent`` → ``read``, marked unread moves it back. Each call is one
transaction."""

from __future__ import annotations

import uuid
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier.db import deliveries, inbox
from notifier.db.models import InboxMessage
from notifier.delivery import state
from notifier.delivery.state import DeliveryStates, Move
from notifier.errors import NotFound
from notifier.types import utcnow

Action = Literal["read", "unread", "archive"]


async def _follow(session: AsyncSession, states: DeliveryStates, items: list[InboxMessage], *, read: bool) -> None:
    """Move the deliveries of ``items`` to match their messages' new read state."""
    now = utcnow()
    locked = await deliveries.lock_many(session, [item.delivery_id for item in items if item.delivery_id])
    moves: list[Move] = [
        move for delivery in locked.values() if (move := state.mark_read(delivery, read=read, now=now)) is not None
    ]
    # Read while its attempt is out: the row is marked, so the attempt's outcome is recorded from the locked row,
    # which sees the read (``state.read_while_sending``).
    marked = [delivery for delivery in locked.values() if read and state.read_while_sending(delivery, now=now)]
    await deliveries.write(session, marked)
    await states.record(session, moves, now=now)


async def change(
    sessions: async_sessionmaker[AsyncSession],
    states: DeliveryStates,
    *,
    user_id: str,
    message_id: uuid.UUID,
    action: Action,
) -> tuple[InboxMessage, int]:
    """Apply ``action`` to one of the user's messages; return it and the user's unread count afterwards.

    Raises ``NotFound`` if the message does not exist or belongs to someone else. Repeating an action
    changes nothing.
    """
    now = utcnow()
    async with sessions() as session, session.begin():
        item = await inbox.lock(session, message_id=message_id)
        if item is None or item.user_id != user_id:
            raise NotFound(f"inbox message '{message_id}' not found")
        if action == "read" and item.read_at is None:
            item.read_at = now
            item.seen_at = item.seen_at or now
            await _follow(session, states, [item], read=True)
        elif action == "unread" and item.read_at is not None:
            item.read_at = None
            await _follow(session, states, [item], read=False)
        elif action == "archive" and item.archived_at is None:
            item.archived_at = now
        await session.flush()
        return item, await inbox.unread_count(session, user_id=user_id)


async def read_all(sessions: async_sessionmaker[AsyncSession], states: DeliveryStates, *, user_id: str) -> int:
    """Mark every unread, unarchived message of the user read; return how many were."""
    now = utcnow()
    async with sessions() as session, session.begin():
        items = await inbox.lock_unread(session, user_id=user_id)
        for item in items:
            item.read_at = now
            item.seen_at = item.seen_at or now
        await _follow(session, states, items, read=True)
        return len(items)
