"""The in-app channel: store the message in the user's inbox, then announce it in realtime (Ably).

Storing is the effect that matters (the inbox is always available); the realtime announcement is
retried while it fails transiently, and a permanent refusal there does not undo the stored item.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from notifier.batching import Coalesce
from notifier.channels.base import (
    Announcement,
    InboxStore,
    Message,
    MessageGroup,
    Outcome,
    RealtimePublisher,
    SendResult,
)
from notifier.channels.edge import finish
from notifier.types import ChannelName

ANNOUNCE_LINGER = 0.002
"""Seconds an announcement waits for concurrent ones to join its request (one batch publish for all)."""


def realtime_channel_for(user_id: str) -> str:
    return f"notifications:{user_id}"


class InboxChannel:
    channel: ClassVar[ChannelName] = ChannelName.in_app
    provider: ClassVar[str] = "inbox"
    needs_email: ClassVar[bool] = False
    group_limit: ClassVar[int] = 1000  # messages stored and announced in one attempt; announcements per batch publish

    def __init__(self, store: InboxStore, realtime: RealtimePublisher | None = None) -> None:
        self._store = store
        self._realtime = realtime
        self._announcements = Coalesce(self._announce, max_batch=self.group_limit, linger=ANNOUNCE_LINGER)

    @property
    def dedupe_window(self) -> dt.timedelta | None:
        """The announcement's window (Ably: 2 minutes); None without one, as the inbox keeps one row per delivery."""
        return self._realtime.dedupe_window if self._realtime is not None else None

    async def send(self, message: Message) -> SendResult:
        [result] = await self.send_group(MessageGroup.alone(message))
        return result

    async def send_group(self, group: MessageGroup) -> list[SendResult]:
        """Store every member's message (the store writes concurrent ones together), then announce each on its
        user's channel. Announcements of this group and of attempts running beside it go together: one batch
        publish for several, a channel publish for one alone. Each member's result is its own: the inbox row and
        the announcement carry the delivery id, so a retry of one member never doubles another's."""
        stored = await asyncio.gather(*(self._store_one(message) for message in group.messages))
        if self._realtime is None:
            return [
                item if isinstance(item, SendResult) else SendResult.sent(str(item["id"]), detail="stored")
                for item in stored
            ]
        announce = [
            (i, Announcement(realtime_channel_for(m.recipient.id), m.event_type, m.idempotency_key, item))
            for i, (m, item) in enumerate(zip(group.messages, stored, strict=True))
            if not isinstance(item, SendResult)
        ]
        if not announce:
            return [item for item in stored if isinstance(item, SendResult)]
        published = await asyncio.gather(*(self._announcements.submit(a) for _, a in announce))
        by_index = {i: _announced(a.data, p) for (i, a), p in zip(announce, published, strict=True)}
        return [item if isinstance(item, SendResult) else by_index[i] for i, item in enumerate(stored)]

    async def _announce(self, announcements: Sequence[Announcement]) -> list[SendResult]:
        """Publish what concurrent attempts announce: one batch publish for several, a channel publish for one."""
        assert self._realtime is not None  # nothing is announced without it
        if len(announcements) > 1:
            return await self._realtime.publish_many(announcements)
        [only] = announcements
        result = await self._realtime.publish(
            channel_name=only.channel_name, name=only.name, message_id=only.message_id, data=only.data
        )
        return [result]

    async def _store_one(self, message: Message) -> Mapping[str, Any] | SendResult:
        try:
            return await self._store.store(message)
        except Exception as exc:  # the store is our database; any failure there is transient for this attempt
            return SendResult.retry(f"inbox store failed: {type(exc).__name__}")

    async def aclose(self) -> None:
        return None


def _announced(item: Mapping[str, Any], published: SendResult) -> SendResult:
    """A stored member's result given its announcement's: retry while that is transient, else sent."""
    if published.outcome is Outcome.retry:
        return published
    detail = (
        "stored; announced" if published.outcome is Outcome.sent else f"stored; announce refused: {published.detail}"
    )
    return finish(SendResult.sent(str(item["id"]), http_status=published.http_status, detail=detail))
