"""Request helpers shared by the resource modules: JSON bodies, credentials, cursors, route specs."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from notifier.errors import (
    FieldError,
    Forbidden,
    MalformedBody,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from notifier.runtime import Runtime
from notifier.security import Principal

# "user": only the user named in the path, with their own token (not even a service key).
Auth = Literal["service", "user", "user_or_service", "qstash", "service_or_qstash", "none"]
Endpoint = Callable[[Request], Awaitable[Response]]
MAX_JSON_DEPTH = 32
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


@dataclass(frozen=True)
class ApiRoute:
    """One documented route: what Starlette serves and what /openapi.json describes."""

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


def authenticate(request: Request, *, allow_user: bool) -> Principal:
    runtime = runtime_of(request)
    return runtime.authenticator.authenticate(request.headers.get("authorization"), allow_user=allow_user)


def require_service(request: Request) -> Principal:
    principal = authenticate(request, allow_user=False)
    principal.require_service()
    return principal


def require_user_or_service(request: Request, user_id: str) -> Principal:
    principal = authenticate(request, allow_user=True)
    principal.require_user_or_service(user_id)
    return principal


def require_user(request: Request, user_id: str) -> Principal:
    """Return the principal if it is ``user_id``'s own token; raise ``Forbidden`` for any other valid credential."""
    principal = authenticate(request, allow_user=True)
    if principal.kind != "user" or principal.user_id != user_id:
        raise Forbidden("only the user's own token may call this route")
    return principal


async def read_body(request: Request) -> bytes:
    """Return the raw body, refusing more than NOTIFIER_MAX_BODY_BYTES without reading it all."""
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
    return b"".join(chunks)


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


async def read_json(request: Request, *, accept: tuple[str, ...] = ("application/json",)) -> Any:
    return parse_json(await read_body(request), request.headers.get("content-type"), accept=accept)


def path_uuid(request: Request, name: str) -> uuid.UUID:
    raw = request.path_params[name]
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        from notifier.errors import NotFound

        raise NotFound(f"{name.replace('_', ' ')} '{raw}' not found") from exc


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
