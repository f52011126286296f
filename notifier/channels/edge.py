"""What every channel does at its edge, written once: reading ``Retry-After``, describing an exception, and
finishing a result (secrets removed, then the provider's words cut to a storable length)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from notifier.channels.base import SendResult

PROVIDER_REPLY_LIMIT = 500
REDACTED = "[redacted]"


def header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """The value of header ``name`` in any mapping (httpx, urllib3 or a plain dict), compared case-insensitively."""
    if not headers:
        return None
    wanted = name.lower()
    for key, value in headers.items():
        if str(key).lower() == wanted:
            return str(value).strip()
    return None


def retry_after_seconds(headers: Mapping[str, Any] | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Return the wait the provider asked for, in seconds, or None when it asked for none (or garbled it).

    Reads ``retry-after-ms`` (Knock/Stainless, milliseconds) first, then ``Retry-After`` as seconds or as an
    HTTP date (RFC 9110); a date in the past means 0, a negative or non-finite delay is garbled.
    """
    raw_ms = header(headers, "retry-after-ms")
    if raw_ms is not None:
        try:
            millis = float(raw_ms)
        except ValueError:
            millis = math.nan
        if math.isfinite(millis) and millis >= 0:
            return millis / 1000
    raw = header(headers, "retry-after")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are always GMT
            when = when.replace(tzinfo=dt.UTC)
        return max(0.0, when.timestamp() - now())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def describe(exc: BaseException) -> str:
    """``ExceptionClass: message`` (just the class when there is no message)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def truncate(text: str, limit: int = PROVIDER_REPLY_LIMIT) -> str:
    """Return ``text`` cut to ``limit`` characters, marked when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each (non-empty) secret replaced, longest first."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def finish(result: SendResult, secrets: Iterable[str] = ()) -> SendResult:
    """The result a channel returns: its detail without ``secrets`` and then cut to ``PROVIDER_REPLY_LIMIT``.

    In this order: a secret that straddled the cut would otherwise leave its first characters behind.
    """
    detail = truncate(redact(result.detail, secrets))
    return result if detail == result.detail else dataclasses.replace(result, detail=detail)
