"""Claimed deliveries (``Claim``, ``Batch``) and turning them into what a channel sends: one content for all
members, one recipient each."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from notifier.catalog import Catalog, EventType
from notifier.channels.base import Message, MessageGroup, Recipient, SendResult
from notifier.channels.registry import ChannelRegistry
from notifier.db.models import Delivery, Event, User
from notifier.errors import TemplateError
from notifier.types import ChannelName, Reason


@dataclass
class Claim:
    """One delivery leased to an attempt: its row, what rendering needs, and its attempt number."""

    delivery: Delivery
    event: Event
    user: User | None  # None when the user was erased
    number: int
    digest_count: int


@dataclass
class Batch:
    """Claims attempted with one provider call under one lease (``token``): a send group's members, or one
    delivery alone."""

    claims: list[Claim]
    token: uuid.UUID
    via: str

    @property
    def key(self) -> str:
        """The provider idempotency key: the send group's id, or the delivery's when it goes alone."""
        first = self.claims[0].delivery
        return str(first.send_group or first.id)

    @property
    def delivery_ids(self) -> list[uuid.UUID]:
        return [claim.delivery.id for claim in self.claims]


class ClaimedBatches(list[Batch]):
    """The batches of one claim; ``contended`` when due rows were left out because another claim held part of their
    send group at that moment (they are due again as soon as it commits); ``planned``: the fallback deliveries the
    claim planned for rows it failed instead (their retry budget was spent), due now."""

    contended: bool = False
    planned: int = 0


def group_message(
    key: str, claims: Sequence[Claim], *, catalog: Catalog, channels: ChannelRegistry, app_url: str
) -> tuple[MessageGroup | None, list[SendResult | None]]:
    """The messages for ``claims`` (one attempt, under idempotency ``key``), and the results of members that
    cannot be sent at all (None for each member that is in the group; no group when none is).

    ``app_url`` (``NOTIFIER_APP_URL``) makes an email's relative action URL absolute (``EventType.render``)."""
    event = claims[0].event
    event_type = catalog.get(event.type)
    if event_type is None:
        gone = SendResult.failed(Reason.template_error, f"event type '{event.type}' is no longer in the catalog")
        return None, [gone] * len(claims)
    channel = ChannelName(claims[0].delivery.channel)
    implementation = channels.get(channel)
    if implementation is None:
        off = SendResult.failed(Reason.channel_unavailable, f"no provider is configured for {channel}")
        return None, [off] * len(claims)
    unsendable: list[SendResult | None] = [
        SendResult.failed(Reason.no_address, "the recipient has no email address")
        if implementation.needs_email and not (claim.user and claim.user.email)
        else None
        for claim in claims
    ]
    members = [claim for claim, refused in zip(claims, unsendable, strict=True) if refused is None]
    if not members:
        return None, unsendable
    try:
        messages = _messages(event_type, channel, members, app_url)
    except TemplateError as exc:
        return None, [SendResult.failed(Reason.template_error, exc.detail)] * len(claims)
    return MessageGroup(key, tuple(messages)), unsendable


def _messages(event_type: EventType, channel: ChannelName, claims: Sequence[Claim], app_url: str) -> list[Message]:
    """One message per claim, all with the content rendered once for the first member (a send group's members
    share the template, and ``app_url`` is one for the process; a digest head goes alone). Raises ``TemplateError``."""
    first = claims[0]
    locale = first.user.locale if first.user else None
    rendered = event_type.render(channel, locale, first.event.data, digest_count=first.digest_count, app_url=app_url)
    data = {**first.event.data, "event_id": str(first.event.id), "event_type": first.event.type}
    return [
        Message(
            delivery_id=claim.delivery.id,
            event_id=claim.event.id,
            event_type=claim.event.type,
            channel=channel,
            recipient=_recipient(claim.delivery.user_id, claim.user),
            title=rendered.title,
            body=rendered.body,
            html=rendered.html,
            data=data,
            action_url=rendered.action_url,
        )
        for claim in claims
    ]


def _recipient(user_id: str, user: User | None) -> Recipient:
    if user is None:
        return Recipient(id=user_id)
    return Recipient(id=user_id, email=user.email, name=user.name, locale=user.locale, timezone=user.timezone)
