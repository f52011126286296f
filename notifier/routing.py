"""Planning: who hears an event, on which channel, when — a pure function (no I/O).

``plan_deliveries`` takes everything it needs as arguments (the event type, recipients' profiles,
their preference documents, presence, open digests, which channels are live, the clock) and
returns one ``Decision`` per (recipient, channel). The same function drives ingest, the preview
endpoint and the fallback planner, so "why did user X (not) get this?" has one answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from notifier.catalog import EventType
from notifier.preferences.document import EMPTY_DOCUMENT, PreferenceDocument
from notifier.preferences.quiet_hours import quiet_hours_end
from notifier.preferences.resolution import resolve_channel

__all__ = [
    "ChannelInfo",
    "Decision",
    "Profile",
    "digest_key_for",
    "group_sends",
    "plan_deliveries",
    "presence_channel_for",
]
from notifier.types import ALL_CHANNELS, DISPATCHABLE_STATUSES, ChannelInfo, ChannelName, DeliveryStatus, Reason

INTERRUPTIBLE = frozenset({ChannelName.push, ChannelName.email})  # what mute and quiet hours hold back


@dataclass(frozen=True)
class Profile:
    """What routing needs to know about a recipient."""

    id: str
    organization_id: str | None = None
    email: str | None = None
    locale: str | None = None
    timezone: str | None = None


@dataclass(frozen=True)
class Decision:
    """The plan for one (user, channel). ``status`` None means no delivery row is created."""

    user_id: str
    channel: ChannelName
    status: DeliveryStatus | None
    reason: Reason | None
    not_before: dt.datetime | None
    source: str  # which preference level decided: default|organization|channel|category|event_type|critical
    explanation: str
    provider: str | None = None
    digest_key: str | None = None

    @property
    def creates_delivery(self) -> bool:
        return self.status is not None

    @property
    def dispatchable(self) -> bool:
        return self.status in DISPATCHABLE_STATUSES


def digest_key_for(event_type: EventType, user_id: str, data: Mapping[str, Any]) -> str | None:
    """The key under which this event's digest channel folds with others for ``user_id``."""
    return event_type.digest_key(user_id, data)


def presence_channel_for(event_type: EventType, data: Mapping[str, Any]) -> str | None:
    """The realtime channel whose present members do not get this event's presence-suppressed channels."""
    return event_type.presence_channel_name(data)


def plan_deliveries(
    *,
    event_type: EventType,
    data: Mapping[str, Any],
    recipients: Sequence[Profile],
    actor: str | None,
    preferences: Mapping[str, PreferenceDocument],
    organization_preferences: Mapping[str, PreferenceDocument],
    live_channels: Mapping[ChannelName, ChannelInfo],
    now: dt.datetime,
    send_at: dt.datetime | None = None,
    present_users: Collection[str] = frozenset(),
    open_digests: Collection[str] = frozenset(),
    digest_window: dt.timedelta = dt.timedelta(0),
    channels: Collection[ChannelName] = ALL_CHANNELS,
    fallback_for: ChannelName | None = None,
    event_organization_id: str | None = None,
) -> list[Decision]:
    """Return one decision per (recipient, channel in ``channels``), in recipient order.

    ``fallback_for`` plans the fallback of a failed delivery on that channel: the fallback channel
    counts as a default channel, and no digest applies.
    """
    due = max(now, send_at) if send_at else now
    extra_defaults = frozenset(channels) if fallback_for is not None else frozenset()
    decisions: list[Decision] = []
    for profile in recipients:
        user_doc = preferences.get(profile.id, EMPTY_DOCUMENT)
        org_id = profile.organization_id or event_organization_id
        org_doc = organization_preferences.get(org_id) if org_id else None
        for channel in channels:
            decisions.append(
                _decide(
                    event_type=event_type,
                    data=data,
                    profile=profile,
                    channel=channel,
                    user_doc=user_doc,
                    org_doc=org_doc,
                    actor=actor,
                    live=live_channels.get(channel),
                    now=now,
                    due=due,
                    send_at=send_at,
                    present=profile.id in present_users,
                    open_digests=open_digests,
                    digest_window=digest_window,
                    extra_defaults=extra_defaults,
                    is_fallback=fallback_for is not None,
                )
            )
    return decisions


def _decide(
    *,
    event_type: EventType,
    data: Mapping[str, Any],
    profile: Profile,
    channel: ChannelName,
    user_doc: PreferenceDocument,
    org_doc: PreferenceDocument | None,
    actor: str | None,
    live: ChannelInfo | None,
    now: dt.datetime,
    due: dt.datetime,
    send_at: dt.datetime | None,
    present: bool,
    open_digests: Collection[str],
    digest_window: dt.timedelta,
    extra_defaults: frozenset[ChannelName],
    is_fallback: bool,
) -> Decision:
    resolution = resolve_channel(event_type, channel, user_doc, org_doc, extra_defaults=extra_defaults)
    provider = live.provider if live else None

    def decision(
        status: DeliveryStatus | None,
        reason: Reason | None,
        explanation: str,
        not_before: dt.datetime | None = None,
        digest_key: str | None = None,
    ) -> Decision:
        return Decision(
            profile.id, channel, status, reason, not_before, resolution.source, explanation, provider, digest_key
        )

    if channel not in event_type.allowed_channels:
        return decision(None, None, f"{event_type.name} is never sent on {channel}")
    if not resolution.enabled and not resolution.explicit:
        return decision(None, None, f"{channel} is not a default channel of {event_type.name} and nobody opted in")
    if actor is not None and profile.id == actor:
        return decision(DeliveryStatus.suppressed, Reason.actor, "the recipient caused the event")
    if not resolution.enabled:
        return decision(
            DeliveryStatus.suppressed, Reason.opted_out, f"turned off by the {resolution.source} preference"
        )
    if live is None:
        return decision(
            DeliveryStatus.suppressed, Reason.channel_unavailable, f"no provider is configured for {channel}"
        )
    if live.needs_email and not profile.email:
        return decision(DeliveryStatus.suppressed, Reason.no_address, "the recipient has no email address")
    critical = resolution.source == "critical"
    if not critical and channel in INTERRUPTIBLE and user_doc.muted_until and user_doc.muted_until > now:
        return decision(DeliveryStatus.suppressed, Reason.muted, f"muted until {user_doc.muted_until.isoformat()}")
    if channel in event_type.presence_suppresses and present:
        return decision(DeliveryStatus.suppressed, Reason.recipient_online, "the recipient is in the conversation")

    not_before: dt.datetime | None = send_at if send_at and send_at > now else None
    explanation = f"enabled by the {resolution.source} preference"
    digest_key = None
    if not is_fallback and event_type.digest is not None and event_type.digest.channel == channel:
        digest_key = digest_key_for(event_type, profile.id, data)
        if digest_key in open_digests:
            return decision(
                DeliveryStatus.suppressed, Reason.digested, "folded into a pending digest", digest_key=digest_key
            )
        if digest_window > dt.timedelta(0):
            not_before = due + digest_window
            explanation += f"; held {int(digest_window.total_seconds())}s to collect a digest"
    if not critical and channel in INTERRUPTIBLE and user_doc.quiet_hours is not None:
        quiet_end = quiet_hours_end(user_doc.quiet_hours, not_before or due, profile.timezone)
        if quiet_end is not None:
            not_before = quiet_end
            explanation += f"; quiet hours until {quiet_end.isoformat()}"
    if not_before is not None and not_before > now:
        return decision(DeliveryStatus.deferred, None, explanation, not_before, digest_key)
    return decision(DeliveryStatus.queued, None, explanation, None, digest_key)


def group_sends(
    decisions: Sequence[Decision],
    *,
    event_type: EventType,
    locales: Mapping[str, str | None],
    live_channels: Mapping[ChannelName, ChannelInfo],
) -> list[list[int]]:
    """Return the send groups among one event's ``decisions``: lists of indexes into ``decisions``.

    Deliveries on one channel whose message is the same (the same template, in the same locale variant: the
    recipients' ``locales`` decide) and that are due at the same moment form a group, attempted with one
    provider call, up to the channel's ``group_limit``. A group has two members or more; every other delivery
    goes alone: suppressed ones, digest deliveries (their message counts what was folded into each, per
    recipient), and channels whose provider takes one recipient per call.
    """
    buckets: dict[tuple[ChannelName, tuple[str, str], dt.datetime | None], list[int]] = {}
    for index, decision in enumerate(decisions):
        info = live_channels.get(decision.channel)
        if not decision.dispatchable or decision.digest_key is not None or info is None or info.group_limit < 2:
            continue
        template = event_type.template_choice(str(decision.channel), locales.get(decision.user_id))
        buckets.setdefault((decision.channel, template, decision.not_before), []).append(index)
    groups: list[list[int]] = []
    for (channel, _, _), members in buckets.items():
        limit = live_channels[channel].group_limit
        groups.extend(
            chunk for start in range(0, len(members), limit) if len(chunk := members[start : start + limit]) > 1
        )
    return groups
