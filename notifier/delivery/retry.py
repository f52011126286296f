"""The retry schedule: when a delivery whose attempt failed transiently is tried again.

Pure functions of the attempt count, the provider's Retry-After and the provider's dedupe window;
``DeliveryRunner`` applies them when it records a retry, and QStash mode hands the same delay back
to QStash as ``Retry-After``.
"""

from __future__ import annotations

import datetime as dt
import math

MAX_BACKOFF_SECONDS = 86400.0


def backoff_seconds(retries_so_far: int, *, scale: float = 1.0, retry_after: float | None = None) -> float:
    """QStash's default schedule, min(1 day, e^(2.5·n)) s for the n-th retry (12 s, 2m28s, 30m…), scaled.

    A provider's Retry-After wins (capped at a day).
    """
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, MAX_BACKOFF_SECONDS)
    return min(MAX_BACKOFF_SECONDS, math.exp(2.5 * retries_so_far)) * scale


# Room left before a provider's dedupe window closes, for the retry's lateness (dispatch lag, the
# attempt's own duration, clock skew): a quarter of the window, at most an hour (Ably: 30 s, Knock: 1 h).
WINDOW_MARGIN_FRACTION = 0.25
MAX_WINDOW_MARGIN_SECONDS = 3600.0


def retry_delay(
    retries_so_far: int,
    *,
    scale: float = 1.0,
    retry_after: float | None = None,
    window: dt.timedelta | None = None,
    since: dt.datetime,
    now: dt.datetime,
) -> tuple[float, str | None]:
    """Return the delay before the next retry, and a note when the provider's dedupe window shortened it.

    The delay is ``backoff_seconds``'s. ``window`` (the channel's ``dedupe_window``) opened no earlier than
    ``since`` (the delivery's creation, which precedes its first attempt). A retry the schedule would put
    past the window less a margin is brought forward to land just inside it, so the provider still knows
    the key; but never sooner than the schedule's previous step, so retries still back off. The delay
    stands, with no note, when it fits, when the provider asked for it (Retry-After), when the channel has
    no window, or when too little of the window is left: that retry goes out past the window with the same
    key (at least once).
    """
    delay = backoff_seconds(retries_so_far, scale=scale, retry_after=retry_after)
    if window is None or (retry_after is not None and retry_after >= 0):
        return delay, None
    seconds = window.total_seconds()
    margin = min(seconds * WINDOW_MARGIN_FRACTION, MAX_WINDOW_MARGIN_SECONDS)
    last_safe = seconds - margin - (now - since).total_seconds()
    if delay <= last_safe or last_safe < backoff_seconds(retries_so_far - 1, scale=scale):
        return delay, None
    return (
        last_safe,
        f"retry in {_span(last_safe)}, not {_span(delay)}: kept inside the provider's {_span(seconds)} dedupe window",
    )


def _span(seconds: float) -> str:
    """``seconds`` as ``1d``, ``16h21m``, ``2m28s`` or ``12s``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value][:2]
    return "".join(shown) or "0s"
