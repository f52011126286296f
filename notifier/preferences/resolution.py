"""Effective preference resolution (the contract's "Resolution" rules 1-2, plus critical types)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from notifier.catalog import EventType
from notifier.preferences.document import EMPTY_DOCUMENT, PreferenceDocument
from notifier.types import ChannelName

Source = Literal["default", "organization", "channel", "category", "event_type", "critical"]


@dataclass(frozen=True)
class Resolution:
    enabled: bool
    source: Source
    explicit: bool  # decided by someone's stated preference, not by the catalog default


def resolve_channel(
    event_type: EventType,
    channel: ChannelName,
    user: PreferenceDocument = EMPTY_DOCUMENT,
    organization: PreferenceDocument | None = None,
    *,
    extra_defaults: frozenset[ChannelName] = frozenset(),
) -> Resolution:
    """Decide whether ``channel`` is on for ``event_type`` and who decided.

    Order: unsupported channel → off; critical default channel → on; the user's global switch off →
    off; then the first explicit value of user event type, user category, organization event type,
    organization category, organization global switch; else the catalog default (plus
    ``extra_defaults``, used when planning a fallback channel).
    """
    if channel not in event_type.allowed_channels:
        return Resolution(False, "default", explicit=False)
    if event_type.critical and channel in event_type.default_channels:
        return Resolution(True, "critical", explicit=False)
    if user.channels.get(channel) is False:
        return Resolution(False, "channel", explicit=True)
    org = organization or EMPTY_DOCUMENT
    candidates: tuple[tuple[bool | None, Source], ...] = (
        (user.event_types.get(event_type.name, {}).get(channel), "event_type"),
        (user.categories.get(event_type.category, {}).get(channel), "category"),
        (org.event_types.get(event_type.name, {}).get(channel), "organization"),
        (org.categories.get(event_type.category, {}).get(channel), "organization"),
        (False if org.channels.get(channel) is False else None, "organization"),
    )
    for value, source in candidates:
        if value is not None:
            return Resolution(value, source, explicit=True)
    return Resolution(channel in (event_type.default_channels | extra_defaults), "default", explicit=False)
