"""Request helpers shared by the resource modules: route specs, bodies, path and query values, cursors."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from notifier.errors import (
    FieldError,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from notifier.runtime import Runtime

Auth = Literal[
    "service", "user", "user_or_service", "qstash", "service_or_qstash", "service_or_ticket", "dashboard", "none"
]
Endpoint = Callable[[Request], Awaitable[Response]]
MAX_JSON_DEPTH = 32
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
    if declared and declared.isdigit() and int(declared) > limit:
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


def parse_json(raw: bytes, content_type: str | None, *, accept: tuple[str, ...] = ("application/json",)) -> Any:
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in accept and not (media.startswith("application/") and media.endswith("+json") and media in accept):
        raise UnsupportedMediaType(f"expected {' or '.join(accept)}, got {media or 'no content type'}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise MalformedBody(f"body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise MalformedBody(f"body nests deeper than {MAX_JSON_DEPTH} levels")
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
    """The path parameter ``name`` (a user or organization id); raise ``NotFound`` when no such id can exist."""
    value: str = request.path_params[name]
    if not value or len(value) > 200:
        raise NotFound(f"{name.replace('_', ' ')} not found")
    return value


def query_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
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
    return value


def encode_cursor(created_at: dt.datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(request: Request) -> tuple[dt.datetime, uuid.UUID] | None:
    raw = request.query_params.get("cursor")
    if not raw:
        return None
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        value = dt.datetime.fromisoformat(created), uuid.UUID(row_id)
        if value[0].tzinfo is None:
            raise ValueError("naive")
        return value
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationFailed([FieldError(("query", "cursor"), "not a cursor this service issued")]) from exc
