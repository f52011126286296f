"""Vocabulary shared by every layer: channels, statuses and reasons (names fixed by the contract), and the clock."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


def utcnow() -> dt.datetime:
    """The current instant, tz-aware in UTC (every timestamp notifier stores or compares is)."""
    return dt.datetime.now(dt.UTC)


# Instants a caller may name (send_at, muted_until, since): a day inside what ``datetime`` can hold, so that moving
# one into any time zone (quiet hours, the next day's window end) stays representable.
EARLIEST = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` (tz-aware) in UTC; raise ``ValueError`` when it lies outside ``EARLIEST``..``LATEST``.

    ``9999-12-31T23:59:59-23:59`` parses, but is past the last instant ``datetime`` holds in UTC.
    """
    if value.tzinfo is None:
        raise ValueError("must have a time zone")
    try:
        utc = value.astimezone(dt.UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise ValueError(f"must lie between {EARLIEST.date()} and {LATEST.date()} (UTC)")
    return utc


# C0 and C1 control characters, DEL and the Unicode line and paragraph separators, as a regex character class:
# what an id or a name never contains (``str.splitlines`` breaks at several of them; PostgreSQL refuses NUL).
CONTROL_CHARACTERS = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")


def control_character_in(text: str) -> str | None:
    """The first control character (``CONTROL_CHARACTERS``) in ``text``, None if there is none."""
    found = _CONTROL.search(text)
    return found.group() if found else None


def text_problem(value: str, *, longest: int) -> str | None:
    """What keeps ``value`` from being a short name stored and shown as given (a type filter, a message id, a
    credential's id): None when nothing does. It is 1 to ``longest`` characters, none of them a control
    character or an unpaired surrogate (which no UTF-8 column or log line can hold).
    """
    if not 1 <= len(value) <= longest:
        return f"must be 1 to {longest} characters"
    if (found := control_character_in(value)) is not None:
        return f"must not contain control characters (found U+{ord(found):04X})"
    if not value.isascii() and (surrogate := next((c for c in value if "\ud800" <= c <= "\udfff"), None)):
        return f"must not contain an unpaired surrogate (found U+{ord(surrogate):04X})"
    return None


def segment_problem(value: str) -> str | None:
    """What keeps ``value`` from being one segment of a URL path, such as ``/v1/users/{id}``: None when nothing
    does. The router decodes ``%2F`` before matching, and clients resolve ``.`` and ``..`` away, so an id with
    ``/`` or made of dots could be stored but never reached again (read, changed or erased)."""
    if "/" in value:
        return "must not contain '/' (an id is one segment of a URL path)"
    if value in (".", ".."):
        return f"must not be '{value}' (a URL path cannot name it)"
    return None


def id_problem(value: str, *, longest: int = 200) -> str | None:
    """What keeps ``value`` from being an id (a user's, an organization's): None when nothing does.

    An id is a ``text_problem``-free name of 1 to ``longest`` characters that is also one URL path segment
    (``segment_problem``): every user and organization id appears in some route's path.
    """
    return text_problem(value, longest=longest) or segment_problem(value)


LINE_BREAKS = frozenset("\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029")
"""Every character ``str.splitlines`` breaks a line at. A mail header (an email's subject, a recipient's name)
cannot carry one: Python's email package refuses the header, and a bare CR or LF would start a new one."""


def line_break_in(text: str) -> str | None:
    """The first of ``LINE_BREAKS`` in ``text`` (None if there is none)."""
    return next((character for character in text if character in LINE_BREAKS), None)


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
