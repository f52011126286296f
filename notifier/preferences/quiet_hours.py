"""Quiet-hours arithmetic in the user's time zone (windows may cross midnight; DST-aware)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from notifier.preferences.document import QuietHours


def quiet_hours_end(window: QuietHours, at: dt.datetime, fallback_timezone: str | None) -> dt.datetime | None:
    """Return when the quiet window containing instant ``at`` ends (UTC), or None if ``at`` is outside it.

    The window is wall-clock time in ``window.timezone`` (else ``fallback_timezone``, else UTC);
    ``start == end`` is an empty window. The end is computed as a wall-clock time on the right
    local date and then converted, so a DST change inside the window is honoured; the end returned
    is always after ``at``.
    """
    zone = ZoneInfo(window.timezone or fallback_timezone or "UTC")
    local = at.astimezone(zone)
    now_t = local.time().replace(tzinfo=None)
    start, end = window.start, window.end
    if start == end:
        return None
    if start < end:
        inside = start <= now_t < end
        end_date = local.date()
    else:  # crosses midnight: 22:00-07:00
        inside = now_t >= start or now_t < end
        end_date = local.date() + dt.timedelta(days=1) if now_t >= start else local.date()
    if not inside:
        return None
    # A wall-clock end inside a spring-forward gap (02:30 on the change day) has no instant;
    # zoneinfo reads it with the pre-change offset (fold=0), which lands just after the gap (03:30).
    # A wall-clock end inside a fall-back overlap (01:30 on the night 01:00-02:00 is read twice) has two:
    # the first (fold=0) unless it has passed, i.e. ``at`` is in the repeated hour; then the second.
    wall_end = dt.datetime.combine(end_date, end, tzinfo=zone)
    first = wall_end.astimezone(dt.UTC)
    return first if first > at else wall_end.replace(fold=1).astimezone(dt.UTC)
