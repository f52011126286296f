"""Request helpers shared by the resource modules: route specs, bodies, path and query values, cursors.

A route that reads several path and query values reads each with ``collect`` (its JSON body with
``collect_json``) and then calls ``refuse_if``, so that one 422 names every bad value and every bad field.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
import re
import sys
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from notifier.errors import (
    FieldError,
    Loc,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from notifier.runtime import Runtime
from notifier.types import as_utc, id_problem, text_problem

Auth = Literal[
    "service", "user", "user_or_service", "qstash", "service_or_qstash", "service_or_ticket", "dashboard", "none"
]
Endpoint = Callable[[Request], Awaitable[Response]]
Cursor = tuple[dt.datetime, uuid.UUID]
T = TypeVar("T")
MAX_JSON_DEPTH = 32
MAX_INTEGER_DIGITS = sys.int_info.default_max_str_digits  # 4300: the most Python reads or writes by default
MAX_LISTED_ERRORS = 50  # a body may hold thousands of bad values; the answer names the first ones
_DECIMAL = re.compile(r"[0-9]{1,18}")  # a non-negative integer a header or query may carry
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


@dataclass(frozen=True)
class ApiRoute:
    """One documented route: what Starlette serves, who may call it (``auth``, enforced by ``auth.guard``),
    and what /openapi.json describes."""

    method: str
    path: str
    endpoint: Endpoint
    summary: str
    auth: Auth
    body: type[BaseModel] | None = None
    content_type: str = "application/json"
    responses: dict[int, str] = field(default_factory=dict)
    query: tuple[str, ...] = ()
    tag: str = ""
    # What the route answers with (its own errors included); JSON errors are always problem+json.
    response_types: tuple[str, ...] = ("application/json",)
    # A "qstash" route whose handler spends the verified signature itself, inside its own first transaction
    # (``auth.signature_spender``), instead of ``guard`` spending it in a transaction of its own beforehand.
    spends_signature: bool = False

    def __post_init__(self) -> None:
        if self.spends_signature and self.auth != "qstash":
            raise ValueError(f"{self.path}: only a qstash route has a signature to spend, not a {self.auth} route")


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def read_body(request: Request) -> bytes:
    """Return the raw body, refusing more than NOTIFIER_MAX_BODY_BYTES without reading it all.

    Read once: a second call (the handler, after ``guard`` verified a QStash signature over it) gets the same bytes.
    """
    cached: bytes | None = getattr(request.state, "raw_body", None)
    if cached is not None:
        return cached
    limit = runtime_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and _DECIMAL.fullmatch(declared) and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    request.state.raw_body = body = b"".join(chunks)
    return body


def _depth(value: Any, limit: int) -> int:
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


@dataclass(frozen=True)
class _Refused:
    """Stands in, while a body is parsed, for a number no column or JSON document can hold; says why."""

    reason: str


def _parse_int(text: str) -> int | _Refused:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        return _Refused(f"an integer of {digits} digits is too large (at most {MAX_INTEGER_DIGITS})")
    try:
        return int(text)
    except ValueError:  # the interpreter's own limit may be set lower (PYTHONINTMAXSTRDIGITS)
        return _Refused(f"an integer of {digits} digits is too large")


def _parse_float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"{text[:40]} is too large for a number")


def _parse_constant(name: str) -> _Refused:
    return _Refused(f"{name} is not a JSON number (send null, or the value as a string)")


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains U+0000 (NUL), which cannot be stored"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"contains an unpaired surrogate (U+{ord(text[exc.start]):04X}), which is not text"
    return None


def _shown(key: str) -> str:
    """A key as an error location may show it (a lone surrogate cannot be encoded in the answer)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _unstorable(value: Any) -> list[FieldError]:
    """Every place in a parsed body holding what cannot be stored: a refused number, NUL, a lone surrogate."""
    errors: list[FieldError] = []
    stack: list[tuple[Any, Loc]] = [(value, ())]
    while stack and len(errors) < MAX_LISTED_ERRORS:
        item, loc = stack.pop()
        if isinstance(item, _Refused):
            errors.append(FieldError(loc, item.reason))
        elif isinstance(item, str):
            if (problem := _text_problem(item)) is not None:
                errors.append(FieldError(loc, problem))
        elif isinstance(item, dict):
            for key, child in item.items():
                if (problem := _text_problem(key)) is not None:
                    errors.append(FieldError((*loc, _shown(key)), f"this key {problem}"))
                stack.append((child, (*loc, _shown(key))))
        elif isinstance(item, list):
            stack.extend((child, (*loc, index)) for index, child in enumerate(item))
    return sorted(errors, key=lambda error: [str(part) for part in error.loc])


def parse_json(raw: bytes, content_type: str | None, *, accept: tuple[str, ...] = ("application/json",)) -> Any:
    """The JSON value of a body; raise ``UnsupportedMediaType``, ``MalformedBody`` (not UTF-8, not JSON, nested
    too deep) or ``ValidationFailed`` naming every value nothing could store (NaN, Infinity, a number out of
    range, a string with NUL or an unpaired surrogate)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in accept and not (media.startswith("application/") and media.endswith("+json") and media in accept):
        raise UnsupportedMediaType(f"expected {' or '.join(accept)}, got {media or 'no content type'}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"body is not valid UTF-8 (byte {exc.start})") from exc
    refused: list[_Refused] = []

    def noted(found: int | float | _Refused) -> Any:
        if isinstance(found, _Refused):
            refused.append(found)
        return found

    try:
        value = json.loads(
            text,
            parse_int=lambda t: noted(_parse_int(t)),
            parse_float=lambda t: noted(_parse_float(t)),
            parse_constant=lambda t: noted(_parse_constant(t)),
        )
    except json.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise MalformedBody(f"body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise MalformedBody(f"body nests deeper than {MAX_JSON_DEPTH} levels")
    # Only a \u escape brings NUL or a surrogate into a string: the parser refuses raw control characters, and
    # valid UTF-8 holds no surrogates. Most bodies have neither escape nor refused number, and skip the walk.
    if (refused or "\\u" in text) and (errors := _unstorable(value)):
        raise ValidationFailed(errors)
    return value


async def read_form(request: Request) -> dict[str, str]:
    """Return the fields of a form-encoded body (first value of each); an empty body is an empty form."""
    raw = await read_body(request)
    if not raw:
        return {}
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType(f"expected application/x-www-form-urlencoded, got {media or 'no content type'}")
    try:
        fields = urllib.parse.parse_qs(raw.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError as exc:
        raise MalformedBody("form body is not valid UTF-8") from exc
    return {name: values[0] for name, values in fields.items()}


async def read_json(request: Request, *, accept: tuple[str, ...] = ("application/json",)) -> Any:
    return parse_json(await read_body(request), request.headers.get("content-type"), accept=accept)


def path_uuid(request: Request, name: str) -> uuid.UUID:
    """The path parameter ``name`` as a UUID; raise ``NotFound`` when it is not one (no such resource)."""
    raw = request.path_params[name]
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound(f"{name.replace('_', ' ')} '{raw}' not found") from exc


def path_id(request: Request, name: str) -> str:
    """The path parameter ``name`` (a user or organization id); raise ``ValidationFailed`` when it cannot be one
    (``types.id_problem``: the rule every id is stored under)."""
    value: str = request.path_params[name]
    if (problem := id_problem(value)) is not None:
        raise ValidationFailed([FieldError(("path", name), problem)])
    return value


def query_text(request: Request, name: str, *, longest: int) -> str | None:
    """The query parameter ``name`` (an id or a type to filter by), None when absent; raise ``ValidationFailed``
    unless it is 1 to ``longest`` characters without control characters."""
    value = request.query_params.get(name)
    if value is not None and (problem := text_problem(value, longest=longest)) is not None:
        raise ValidationFailed([FieldError(("query", name), problem)])
    return value


def collect(errors: list[FieldError], read: Callable[[], T], fallback: T) -> T:
    """``read()``; if it raises ``ValidationFailed``, its errors are added to ``errors`` and ``fallback`` stands in
    until the route calls ``refuse_if(errors)``."""
    try:
        return read()
    except ValidationFailed as exc:
        errors.extend(exc.errors)
        return fallback


def refuse_if(errors: list[FieldError]) -> None:
    """Raise ``ValidationFailed`` naming every collected error, if there is any."""
    if errors:
        raise ValidationFailed(errors)


async def collect_json(
    errors: list[FieldError],
    request: Request,
    parse: Callable[[Any], T],
    fallback: T,
    *,
    accept: tuple[str, ...] = ("application/json",),
) -> T:
    """``parse`` applied to the JSON body, collected as ``collect`` does: the body's bad fields (``parse``'s, or
    the values nothing could store) are added to ``errors``, and ``fallback`` stands in until ``refuse_if``.

    A body that cannot be read at all (415, 400, 413) has no fields to name. When ``errors`` already holds a bad
    path value the answer is that 422, as if the body had not been looked at; otherwise it is the body's own
    status. A caller who fixes the path then learns what is wrong with the body.
    """
    try:
        raw = await read_json(request, accept=accept)
    except (UnsupportedMediaType, MalformedBody, PayloadTooLarge):
        refuse_if(errors)
        raise
    except ValidationFailed as exc:
        errors.extend(exc.errors)
        return fallback
    return collect(errors, lambda: parse(raw), fallback)


def query_page(request: Request, errors: list[FieldError]) -> tuple[int, Cursor | None]:
    """A list route's ``limit`` and ``cursor``, the bad ones collected into ``errors``."""
    limit = collect(errors, lambda: query_limit(request), DEFAULT_LIMIT)
    return limit, collect(errors, lambda: decode_cursor(request), None)


def query_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not _DECIMAL.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValidationFailed([FieldError(("query", "limit"), f"must be an integer from 1 to {MAX_LIMIT}")])
    return int(raw)


def query_since(request: Request) -> dt.datetime | None:
    raw = request.query_params.get("since")
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ValidationFailed([FieldError(("query", "since"), "must be an ISO 8601 timestamp with a time zone")])
    try:
        return as_utc(value)
    except ValueError as exc:
        raise ValidationFailed([FieldError(("query", "since"), str(exc))]) from exc


def encode_cursor(created_at: dt.datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(request: Request) -> Cursor | None:
    raw = request.query_params.get("cursor")
    if not raw:
        return None
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not isinstance(created, str) or not isinstance(row_id, str):
            raise TypeError("a cursor holds two strings")
        return as_utc(dt.datetime.fromisoformat(created)), uuid.UUID(row_id)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationFailed([FieldError(("query", "cursor"), "not a cursor this service issued")]) from exc
