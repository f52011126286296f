"""The channel protocol: a rendered message in, a classified provider outcome out.

A channel is one async ``send(message) -> SendResult`` plus ``aclose()``. It never retries on its
own (the dispatcher or QStash owns retries), never touches the database and never imports
Starlette. It translates every exception its SDK raises, and the raw httpx/urllib3 ones the SDKs
let through, into a ``SendResult`` at one edge.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from notifier.types import ChannelName, Reason

# Namespace for deterministic UUID idempotency keys (OneSignal wants a UUID).
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1c1f38-4a7e-5d9c-9a43-2d1f2f4b7a10")


@dataclass(frozen=True)
class Recipient:
    """Who a message is for, as far as a provider needs to know."""

    id: str
    email: str | None = None
    name: str | None = None
    locale: str | None = None
    timezone: str | None = None


@dataclass(frozen=True)
class Message:
    """A rendered notification for one recipient on one channel.

    ``idempotency_key`` is derived from the delivery id and is the same on every attempt, so a
    provider that dedupes by key sees a retried or redelivered message once.
    """

    delivery_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    channel: ChannelName
    recipient: Recipient
    title: str
    body: str
    html: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    action_url: str | None = None

    @property
    def idempotency_key(self) -> str:
        return str(self.delivery_id)

    @property
    def idempotency_uuid(self) -> uuid.UUID:
        """A UUID derived from the delivery id, for providers that require a UUID key."""
        return uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(self.delivery_id))


@dataclass(frozen=True)
class MessageGroup:
    """Messages with the same content for several recipients, sent with one provider call where the provider
    can carry several recipients (a *send group*), each still classified on its own.

    ``key`` is the call's idempotency key: the send group's id, or the delivery id of a message that goes
    alone. Every attempt of the group carries the same key and the same members, so a provider that dedupes
    by key creates the group's notification once.
    """

    key: str
    messages: tuple[Message, ...]

    @classmethod
    def alone(cls, message: Message) -> MessageGroup:
        """A group of one: the key is the message's own, as if there were no groups."""
        return cls(message.idempotency_key, (message,))

    @property
    def content(self) -> Message:
        """The first message: title, body and data are the same for every member."""
        return self.messages[0]

    @property
    def idempotency_uuid(self) -> uuid.UUID:
        """A UUID derived from ``key``, for providers that require a UUID key."""
        return uuid.uuid5(IDEMPOTENCY_NAMESPACE, self.key)


class Outcome(StrEnum):
    """What a provider call amounted to."""

    sent = "sent"  # accepted; provider_message_id says under which id
    retry = "retry"  # transient; try again (after retry_after seconds when the provider said so)
    failed = "failed"  # permanent; reason says why


@dataclass(frozen=True)
class SendResult:
    """The classified outcome of one provider call. Never a bare bool.

    ``detail`` is what the provider said; a channel returns it through ``edge.finish`` (secrets removed, then
    cut to a storable length).
    """

    outcome: Outcome
    provider_message_id: str | None = None
    retry_after: float | None = None
    reason: Reason | None = None
    http_status: int | None = None
    detail: str = ""  # what the provider said

    @classmethod
    def sent(cls, provider_message_id: str | None, *, http_status: int | None = None, detail: str = "") -> SendResult:
        return cls(Outcome.sent, provider_message_id=provider_message_id, http_status=http_status, detail=detail)

    @classmethod
    def retry(cls, detail: str, *, retry_after: float | None = None, http_status: int | None = None) -> SendResult:
        return cls(Outcome.retry, retry_after=retry_after, http_status=http_status, detail=detail)

    @classmethod
    def failed(cls, reason: Reason, detail: str, *, http_status: int | None = None) -> SendResult:
        return cls(Outcome.failed, reason=reason, http_status=http_status, detail=detail)

    def noted(self, note: str | None) -> SendResult:
        """Return this result with ``note`` (what notifier decided about it) before the provider's detail."""
        if not note:
            return self
        return replace(self, detail=f"{note}; {self.detail}" if self.detail else note)


@runtime_checkable
class Channel(Protocol):
    """A provider integration for one channel.

    Class data declares capabilities: ``channel`` (which ChannelName it serves), ``provider``
    (a short provider name recorded on deliveries), ``needs_email`` (whether a recipient
    without an email address can be reached), ``group_limit`` (how many recipients one
    ``send_group`` may carry; 1: every message goes alone) and ``dedupe_window``: how long after
    a first attempt the provider still recognises the idempotency key and creates nothing
    new, or None when there is no such window to keep retries inside (the provider never
    forgets the key, or never dedupes).
    """

    channel: ClassVar[ChannelName]
    provider: ClassVar[str]
    needs_email: ClassVar[bool]
    group_limit: ClassVar[int]

    @property
    def dedupe_window(self) -> dt.timedelta | None: ...

    async def send(self, message: Message) -> SendResult:
        """Deliver ``message`` alone and classify the provider's answer. Never raises for provider faults."""
        ...

    async def send_group(self, group: MessageGroup) -> list[SendResult]:
        """Deliver the group's messages (one call where the provider allows) and classify each: one result per
        message, in order. Never raises for provider faults."""
        ...

    async def aclose(self) -> None:
        """Release connections; called once by the app's lifespan."""
        ...


class PresenceChecker(Protocol):
    """Tells whether a user is present on a realtime channel (Ably presence)."""

    async def present_members(self, channel_name: str) -> frozenset[str]:
        """Return the client ids present on ``channel_name``; raise ``PresenceUnavailable`` if unknown."""
        ...

    async def aclose(self) -> None: ...


class PresenceUnavailable(Exception):
    """Raised by a PresenceChecker when presence cannot be determined (provider down, timeout)."""


class InboxStore(Protocol):
    """Where the in-app channel keeps messages; implemented outside channels/ (it needs the database)."""

    async def store(self, message: Message) -> Mapping[str, Any]:
        """Store ``message`` once per delivery id (idempotent) and return the inbox item as JSON."""
        ...


@dataclass(frozen=True)
class Announcement:
    """One realtime message for one channel (``RealtimePublisher.publish_many`` sends several in one request)."""

    channel_name: str
    name: str
    message_id: str
    data: Mapping[str, Any]


class RealtimePublisher(Protocol):
    """Announces a stored inbox item to a user's open apps (Ably).

    ``dedupe_window``: how long a repeated ``message_id`` is dropped by the provider (None: forever or never).
    """

    @property
    def dedupe_window(self) -> dt.timedelta | None: ...

    async def publish(self, *, channel_name: str, name: str, message_id: str, data: Mapping[str, Any]) -> SendResult:
        """Publish once (idempotent by ``message_id``) and classify the outcome."""
        ...

    async def publish_many(self, announcements: Sequence[Announcement]) -> list[SendResult]:
        """Publish each announcement (idempotent by its ``message_id`` on its channel), in one request where the
        provider allows; one classified outcome per announcement, in order."""
        ...

    async def aclose(self) -> None: ...
