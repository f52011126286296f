"""Quiet-hours windows: same-day, crossing midnight, empty, and across DST changes."""

from __future__ import annotations

import datetime as dt

import pytest

from notifier.preferences.document import QuietHours
from notifier.preferences.quiet_hours import quiet_hours_end

UTC = dt.UTC


def window(start: str, end: str, zone: str | None = None) -> QuietHours:
    return QuietHours(start=dt.time.fromisoformat(start), end=dt.time.fromisoformat(end), timezone=zone)


@pytest.mark.parametrize(
    ("start", "end", "at", "expected_end"),
    [
        # same-day window 12:00-14:00 in UTC
        ("12:00", "14:00", dt.datetime(2026, 6, 1, 11, 59, tzinfo=UTC), None),
        ("12:00", "14:00", dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC), dt.datetime(2026, 6, 1, 14, 0, tzinfo=UTC)),
        ("12:00", "14:00", dt.datetime(2026, 6, 1, 14, 0, tzinfo=UTC), None),
        # crossing midnight 22:00-07:00: evening side and morning side end on the right date
        ("22:00", "07:00", dt.datetime(2026, 6, 1, 23, 0, tzinfo=UTC), dt.datetime(2026, 6, 2, 7, 0, tzinfo=UTC)),
        ("22:00", "07:00", dt.datetime(2026, 6, 2, 3, 0, tzinfo=UTC), dt.datetime(2026, 6, 2, 7, 0, tzinfo=UTC)),
        ("22:00", "07:00", dt.datetime(2026, 6, 2, 7, 0, tzinfo=UTC), None),
        ("22:00", "07:00", dt.datetime(2026, 6, 2, 21, 59, tzinfo=UTC), None),
        # start == end is an empty window
        ("09:00", "09:00", dt.datetime(2026, 6, 2, 9, 0, tzinfo=UTC), None),
    ],
)
def test_window_in_utc(start: str, end: str, at: dt.datetime, expected_end: dt.datetime | None) -> None:
    assert quiet_hours_end(window(start, end), at, None) == expected_end


def test_profile_zone_is_used_when_the_window_has_none() -> None:
    at = dt.datetime(2026, 6, 1, 21, 30, tzinfo=UTC)  # 23:30 in Berlin (CEST, UTC+2)
    assert quiet_hours_end(window("22:00", "07:00"), at, "Europe/Berlin") == dt.datetime(2026, 6, 2, 5, 0, tzinfo=UTC)
    assert quiet_hours_end(window("22:00", "07:00"), at, None) is None  # 21:30 UTC is outside in UTC


def test_spring_forward_night_is_an_hour_shorter() -> None:
    # Europe/Berlin moves from UTC+1 to UTC+2 at 02:00 on 29 March 2026.
    at = dt.datetime(2026, 3, 28, 22, 0, tzinfo=UTC)  # 23:00 CET
    end = quiet_hours_end(window("22:00", "07:00", "Europe/Berlin"), at, None)
    assert end == dt.datetime(2026, 3, 29, 5, 0, tzinfo=UTC)  # 07:00 CEST; fixed-offset arithmetic would say 06:00
    assert end - at == dt.timedelta(hours=7)


def test_fall_back_night_is_an_hour_longer() -> None:
    # Europe/Berlin moves from UTC+2 to UTC+1 at 03:00 on 25 October 2026.
    at = dt.datetime(2026, 10, 24, 21, 0, tzinfo=UTC)  # 23:00 CEST
    end = quiet_hours_end(window("22:00", "07:00", "Europe/Berlin"), at, None)
    assert end == dt.datetime(2026, 10, 25, 6, 0, tzinfo=UTC)  # 07:00 CET
    assert end - at == dt.timedelta(hours=9)


def test_end_inside_the_spring_gap_lands_just_after_it() -> None:
    at = dt.datetime(2026, 3, 28, 23, 30, tzinfo=UTC)  # 00:30 CET on the change night
    end = quiet_hours_end(window("00:00", "02:30", "Europe/Berlin"), at, None)
    assert end == dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 CEST: 02:30 does not exist that night


@pytest.mark.parametrize(
    ("at", "expected_end"),
    [
        # America/New_York falls back from EDT (UTC-4) to EST (UTC-5) at 06:00Z on 1 November 2026: the wall
        # clock reads 01:00-02:00 twice. The window ends at the first 01:30 after the instant asked about.
        (dt.datetime(2026, 11, 1, 3, 0, tzinfo=UTC), dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),  # 23:00 EDT
        (dt.datetime(2026, 11, 1, 5, 15, tzinfo=UTC), dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),  # 01:15 EDT
        (dt.datetime(2026, 11, 1, 5, 45, tzinfo=UTC), None),  # 01:45 EDT: after the first 01:30
        # 01:00-01:30 EST, the second time round: still inside, until 01:30 EST (fold=0 would say 05:30Z, the past)
        (dt.datetime(2026, 11, 1, 6, 0, tzinfo=UTC), dt.datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
        (dt.datetime(2026, 11, 1, 6, 15, tzinfo=UTC), dt.datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
        (dt.datetime(2026, 11, 1, 6, 30, tzinfo=UTC), None),  # 01:30 EST
    ],
)
def test_fall_back_night_holds_until_the_end_that_is_still_ahead(
    at: dt.datetime, expected_end: dt.datetime | None
) -> None:
    end = quiet_hours_end(window("22:00", "01:30", "America/New_York"), at, None)
    assert end == expected_end
    assert end is None or end > at  # never an end in the past: that would send at once
