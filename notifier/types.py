"""Vocabulary shared by every layer: channels, statuses and reasons (names fixed by the contract), and the clock."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


def utcnow() -> dt.datetime:
    """The current instant, tz-aware in UTC (every timestamp notifier stores or compares is)."""
    return dt.datetime.now(dt.UTC)


class ChannelName(StrEnum):
    """A way to reach a person; each is served by one provider at a time."""

    push = "push"  # OneSignal mobile/web push
    email = "email"  # Knock workflow, or SMTP when Knock is not configured
    in_app = "in_app"  # the stored inbox, announced over Ably when configured


ALL_CHANNELS: tuple[ChannelName, ...] = (ChannelName.push, ChannelName.email, ChannelName.in_app)


class DeliveryStatus(StrEnum):
    """Where one (event, user, channel) delivery stands."""

    queued = "queued"  # due now (or at not_before after a retry); waiting for a worker or QStash
    deferred = "deferred"  # held until not_before: quiet hours, send_at, or a digest window
    sending = "sending"  # claimed by one attempt; leased so a crashed attempt can be taken over
    sent = "sent"  # the provider accepted it (terminal)
    failed = "failed"  # permanently refused or out of retries (terminal; an operator may retry)
    suppressed = "suppressed"  # deliberately not sent; the reason says why (terminal)
    read = "read"  # an in-app delivery whose inbox message was read (terminal)


TERMINAL_STATUSES = frozenset(
    {DeliveryStatus.sent, DeliveryStatus.failed, DeliveryStatus.suppressed, DeliveryStatus.read}
)
PENDING_STATUSES = frozenset({DeliveryStatus.queued, DeliveryStatus.deferred, DeliveryStatus.sending})
# What ingest hands to the dispatcher: due now (queued) or at not_before (deferred).
DISPATCHABLE_STATUSES = frozenset({DeliveryStatus.queued, DeliveryStatus.deferred})


class Reason(StrEnum):
    """Why a delivery was suppressed or failed."""

    # suppressed
    opted_out = "opted_out"  # the user's (or organization's) preferences turn this channel off
    muted = "muted"  # the user muted push and email until muted_until
    no_address = "no_address"  # the channel needs an address (email) the user does not have
    recipient_online = "recipient_online"  # chat push skipped: the reader is present in the conversation
    channel_unavailable = "channel_unavailable"  # the channel's provider is not configured
    actor = "actor"  # the user caused the event
    digested = "digested"  # folded into another delivery's digest
    # failed
    rejected = "rejected"  # the provider refused it permanently (4xx)
    retries_exhausted = "retries_exhausted"  # every allowed attempt failed
    template_error = "template_error"  # the message could not be rendered
    not_subscribed = "not_subscribed"  # push: the user has no subscribed device


SUPPRESSION_REASONS = frozenset(
    {
        Reason.opted_out,
        Reason.muted,
        Reason.no_address,
        Reason.recipient_online,
        Reason.channel_unavailable,
        Reason.actor,
        Reason.digested,
    }
)
FAILURE_REASONS = frozenset({Reason.rejected, Reason.retries_exhausted, Reason.template_error, Reason.not_subscribed})


@dataclass(frozen=True)
class ChannelInfo:
    """A live channel as routing sees it: which provider serves it, whether it needs an email address, and how
    many recipients one provider call may carry (1: every delivery goes alone)."""

    provider: str
    needs_email: bool = False
    group_limit: int = 1


@dataclass(frozen=True)
class DispatchItem:
    """What a dispatcher hands on as one unit, not before ``not_before`` (None: as soon as possible): a delivery
    that goes alone, or a send group (``send_group``, with its ``members``; ``delivery_id`` is one of them).

    ``generation`` is the unit's dispatch generation: QStash deduplicates a unit's messages by it, so a
    re-publish of the same generation is dropped and a new generation (a deliberate re-dispatch) is not.
    """

    delivery_id: uuid.UUID
    not_before: dt.datetime | None = None
    generation: int = 0
    send_group: uuid.UUID | None = None
    members: tuple[uuid.UUID, ...] = ()

    @property
    def unit(self) -> uuid.UUID:
        """The send group's id, or the delivery's when it goes alone."""
        return self.send_group or self.delivery_id

    @property
    def delivery_ids(self) -> tuple[uuid.UUID, ...]:
        """Every delivery the item carries."""
        return self.members or (self.delivery_id,)


def dispatch_units(
    deliveries: Iterable[tuple[uuid.UUID, dt.datetime | None, uuid.UUID | None, int]],
) -> list[DispatchItem]:
    """One item per delivery alone and per send group, from (id, not_before, send_group, generation) tuples.

    Members of one group share their due time and generation; the first member's are taken.
    """
    units: dict[uuid.UUID, list[tuple[uuid.UUID, dt.datetime | None, uuid.UUID | None, int]]] = {}
    for delivery in deliveries:
        units.setdefault(delivery[2] or delivery[0], []).append(delivery)
    return [
        DispatchItem(
            first,
            not_before,
            generation,
            send_group,
            tuple(member[0] for member in members) if send_group else (),
        )
        for members in units.values()
        for first, not_before, send_group, generation in members[:1]
    ]
