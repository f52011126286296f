"""The preference document: its shape, its validation against the catalog, its defaults.

The same shape serves users and organizations (tenant defaults). Validation lists every bad
field at once, with messages that name the thing and the value.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict

from notifier.catalog import Catalog
from notifier.errors import FieldError, Loc, ValidationFailed
from notifier.types import ALL_CHANNELS, ChannelName, as_utc

_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")  # fullmatch: "$" would take "22:00\n"
_KNOWN_KEYS = ("channels", "categories", "event_types", "quiet_hours", "muted_until")


class QuietHours(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: dt.time
    end: dt.time
    timezone: str | None = None  # None: the user's profile time zone, else UTC


class PreferenceDocument(BaseModel):
    """A validated preference document; absent keys mean "no opinion"."""

    model_config = ConfigDict(frozen=True)

    channels: dict[ChannelName, bool] = {}
    categories: dict[str, dict[ChannelName, bool]] = {}
    event_types: dict[str, dict[ChannelName, bool]] = {}
    quiet_hours: QuietHours | None = None
    muted_until: dt.datetime | None = None

    def public(self, *, fill_channels: bool = True) -> dict[str, Any]:
        """The document as the API shows it (every channel switch present when ``fill_channels``)."""
        channels = (
            {str(c): self.channels.get(c, True) for c in ALL_CHANNELS}
            if fill_channels
            else {str(c): v for c, v in self.channels.items()}
        )
        return {
            "channels": channels,
            "categories": {k: {str(c): v for c, v in m.items()} for k, m in self.categories.items()},
            "event_types": {k: {str(c): v for c, v in m.items()} for k, m in self.event_types.items()},
            "quiet_hours": None
            if self.quiet_hours is None
            else {
                "start": self.quiet_hours.start.strftime("%H:%M"),
                "end": self.quiet_hours.end.strftime("%H:%M"),
                "timezone": self.quiet_hours.timezone,
            },
            "muted_until": self.muted_until.isoformat() if self.muted_until else None,
        }


EMPTY_DOCUMENT = PreferenceDocument()


def is_timezone(name: str) -> bool:
    if name not in _zone_names():
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


_ZONES: frozenset[str] | None = None


def _zone_names() -> frozenset[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = frozenset(available_timezones()) | {"UTC"}
    return _ZONES


def _channel_map(
    raw: Any, loc: Loc, errors: list[FieldError], allowed: frozenset[ChannelName] | None = None
) -> dict[ChannelName, bool]:
    if not isinstance(raw, Mapping):
        errors.append(FieldError(loc, "must be an object of channel: true|false"))
        return {}
    out: dict[ChannelName, bool] = {}
    for name, value in raw.items():
        if name not in ChannelName.__members__:
            errors.append(FieldError((*loc, name), f"unknown channel '{name}' in {'.'.join(map(str, loc))}"))
            continue
        channel = ChannelName(name)
        if not isinstance(value, bool):
            errors.append(FieldError((*loc, name), f"must be true or false, not {value!r}"))
            continue
        if allowed is not None and channel not in allowed and value:
            errors.append(FieldError((*loc, name), f"event type '{loc[-1]}' cannot use channel '{name}'"))
            continue
        out[channel] = value
    return out


def _parse_time(raw: Any, loc: Loc, errors: list[FieldError]) -> dt.time | None:
    if not isinstance(raw, str) or not _HHMM.fullmatch(raw):
        errors.append(FieldError(loc, f"must be a time as HH:MM (00:00-23:59), not {raw!r}"))
        return None
    return dt.time.fromisoformat(raw)


def _parse_muted_until(raw: Any, errors: list[FieldError]) -> dt.datetime | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            value = None
        if value is not None and value.tzinfo is not None:
            try:
                return as_utc(value)
            except ValueError as exc:
                errors.append(FieldError(("muted_until",), f"{exc}, not {raw!r}"))
                return None
    errors.append(FieldError(("muted_until",), f"must be an ISO 8601 timestamp with a time zone or null, not {raw!r}"))
    return None


def _section(raw: Mapping[str, Any], key: str, errors: list[FieldError]) -> Mapping[str, Any]:
    # Only null (or absence) is "no opinion": false, [], 0 and "" are errors, not an empty section that would
    # silently reset every switch in it.
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        noun = {"categories": "category", "event_types": "event type"}[key]
        errors.append(FieldError((key,), f"must be an object of {noun}: {{channel: true|false}}"))
        return {}
    return value


def parse_document(raw: Any, catalog: Catalog) -> PreferenceDocument:
    """Validate ``raw`` against ``catalog``; return it, or raise ``ValidationFailed`` listing every bad field."""
    errors: list[FieldError] = []
    if not isinstance(raw, Mapping):
        raise ValidationFailed([FieldError((), "the preference document must be a JSON object")])
    for key in raw:
        if key not in _KNOWN_KEYS and key != "version":
            errors.append(FieldError((key,), f"unknown field '{key}'"))
    raw_channels = raw.get("channels")
    channels = {} if raw_channels is None else _channel_map(raw_channels, ("channels",), errors)
    categories: dict[str, dict[ChannelName, bool]] = {}
    for name, value in _section(raw, "categories", errors).items():
        if name not in catalog.categories:
            errors.append(FieldError(("categories", name), f"unknown category '{name}'"))
            continue
        categories[name] = _channel_map(value, ("categories", name), errors)
    event_types: dict[str, dict[ChannelName, bool]] = {}
    for name, value in _section(raw, "event_types", errors).items():
        event_type = catalog.get(name)
        if event_type is None:
            errors.append(FieldError(("event_types", name), f"unknown event type '{name}'"))
            continue
        event_types[name] = _channel_map(value, ("event_types", name), errors, event_type.allowed_channels)
    quiet_hours = None
    raw_quiet = raw.get("quiet_hours")
    if raw_quiet is not None:
        if not isinstance(raw_quiet, Mapping):
            errors.append(FieldError(("quiet_hours",), "must be an object with start, end and timezone, or null"))
        else:
            start = _parse_time(raw_quiet.get("start"), ("quiet_hours", "start"), errors)
            end = _parse_time(raw_quiet.get("end"), ("quiet_hours", "end"), errors)
            zone = raw_quiet.get("timezone")
            if zone is not None and (not isinstance(zone, str) or not is_timezone(zone)):
                errors.append(FieldError(("quiet_hours", "timezone"), f"unknown time zone {zone!r}"))
            for key in raw_quiet:
                if key not in ("start", "end", "timezone"):
                    errors.append(FieldError(("quiet_hours", key), f"unknown field '{key}'"))
            if start is not None and end is not None:
                quiet_hours = QuietHours(start=start, end=end, timezone=zone if isinstance(zone, str) else None)
    muted_until = _parse_muted_until(raw.get("muted_until"), errors)
    if errors:
        raise ValidationFailed(errors)
    return PreferenceDocument(
        channels=channels,
        categories=categories,
        event_types=event_types,
        quiet_hours=quiet_hours,
        muted_until=muted_until,
    )


def load_stored(raw: Mapping[str, Any] | None, catalog: Catalog) -> PreferenceDocument:
    """Parse a stored document leniently: entries the catalog no longer knows are dropped, not fatal."""
    if not raw:
        return EMPTY_DOCUMENT
    try:
        return parse_document(raw, catalog)
    except ValidationFailed as exc:
        cleaned: dict[str, Any] = {k: v for k, v in raw.items() if k in _KNOWN_KEYS}
        for error in exc.errors:
            if len(error.loc) >= 2 and error.loc[0] in ("categories", "event_types", "channels"):
                section = dict(cleaned.get(str(error.loc[0])) or {})
                section.pop(str(error.loc[1]), None)
                cleaned[str(error.loc[0])] = section
            elif error.loc:
                cleaned.pop(str(error.loc[0]), None)
        try:
            return parse_document(cleaned, catalog)
        except ValidationFailed:
            return EMPTY_DOCUMENT
