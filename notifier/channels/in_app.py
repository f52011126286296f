"""The in-app channel: store the message in the user's inbox, then announce it in realtime (Ably).

Storing is the effect that matters (the inbox is always available); the realtime announcement is
retried while it fails transiently, and a permanent refusal there does not undo the stored item.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import ClassVar

from notifier.channels.base import InboxStore, Message, MessageGroup, Outcome, RealtimePublisher, SendResult
from notifier.channels.edge import finish
from notifier.types import ChannelName


def realtime_channel_for(user_id: str) -> str:
    return f"notifications:{user_id}"


class InboxChannel:
    channel: ClassVar[ChannelName] = ChannelName.in_app
    provider: ClassVar[str] = "inbox"
    needs_email: ClassVar[bool] = False
    group_limit: ClassVar[int] = 1000  # messages stored and announced in one attempt

    def __init__(self, store: InboxStore, realtime: RealtimePublisher | None = None) -> None:
        self._store = store
        self._realtime = realtime

    @property
    def dedupe_window(self) -> dt.timedelta | None:
        """The announcement's window (Ably: 2 minutes); None without one, as the inbox keeps one row per delivery."""
        return self._realtime.dedupe_window if self._realtime is not None else None

    async def send(self, message: Message) -> SendResult:
        [result] = await self.send_group(MessageGroup.alone(message))
        return result

    async def send_group(self, group: MessageGroup) -> list[SendResult]:
        """Store every member's message (the store writes concurrent ones together), then announce each on its
        user's channel, all at once. Each member's result is its own: the inbox row and the announcement carry
        the delivery id, so a retry of one member never doubles another's."""
        return list(await asyncio.gather(*(self._deliver(message) for message in group.messages)))

    async def _deliver(self, message: Message) -> SendResult:
        try:
            item = await self._store.store(message)
        except Exception as exc:  # the store is our database; any failure there is transient for this attempt
            return SendResult.retry(f"inbox store failed: {type(exc).__name__}")
        if self._realtime is None:
            return SendResult.sent(str(item["id"]), detail="stored")
        published = await self._realtime.publish(
            channel_name=realtime_channel_for(message.recipient.id),
            name=message.event_type,
            message_id=message.idempotency_key,
            data=item,
        )
        if published.outcome is Outcome.retry:
            return published
        detail = (
            "stored; announced"
            if published.outcome is Outcome.sent
            else f"stored; announce refused: {published.detail}"
        )
        return finish(SendResult.sent(str(item["id"]), http_status=published.http_status, detail=detail))

    async def aclose(self) -> None:
        return None
