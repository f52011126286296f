"""The in-app inbox: list with cursor pagination and unread count; read, unread, archive, read-all."""

from __future__ import annotations

from typing import get_args

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.common import ApiRoute, collect, encode_cursor, path_id, path_uuid, query_page, runtime_of
from notifier.db import inbox
from notifier.db.inbox import ArchivedFilter, ReadFilter
from notifier.delivery import reads
from notifier.delivery.inbox_store import inbox_item
from notifier.errors import FieldError, ValidationFailed

STATUSES: tuple[ReadFilter, ...] = get_args(ReadFilter)
ARCHIVED: tuple[ArchivedFilter, ...] = get_args(ArchivedFilter)


async def list_inbox(request: Request) -> Response:
    errors: list[FieldError] = []
    user_id = collect(errors, lambda: path_id(request, "user_id"), "")
    status = request.query_params.get("status", "all")
    archived = request.query_params.get("archived", "false")
    read = next((known for known in STATUSES if known == status), None)
    shown_archived = next((known for known in ARCHIVED if known == archived), None)
    if read is None:
        errors.append(FieldError(("query", "status"), f"must be one of {', '.join(STATUSES)}"))
    if shown_archived is None:
        errors.append(FieldError(("query", "archived"), "must be true, false or all"))
    limit, cursor = query_page(request, errors)
    if errors or read is None or shown_archived is None:
        raise ValidationFailed(errors)
    async with runtime_of(request).sessions() as session:
        shown, following = await inbox.page(
            session, user_id=user_id, read=read, archived=shown_archived, cursor=cursor, limit=limit
        )
        count = await inbox.unread_count(session, user_id=user_id)
    return JSONResponse(
        {
            "data": [inbox_item(item) for item in shown],
            "next_cursor": encode_cursor(*following) if following else None,
            "unread_count": count,
        }
    )


async def _change(request: Request, action: reads.Action) -> Response:
    runtime = runtime_of(request)
    item, count = await reads.change(
        runtime.sessions,
        runtime.states,
        user_id=path_id(request, "user_id"),
        message_id=path_uuid(request, "message_id"),
        action=action,
    )
    return JSONResponse({**inbox_item(item), "unread_count": count})


async def mark_read(request: Request) -> Response:
    return await _change(request, "read")


async def mark_unread(request: Request) -> Response:
    return await _change(request, "unread")


async def archive(request: Request) -> Response:
    return await _change(request, "archive")


async def read_all(request: Request) -> Response:
    runtime = runtime_of(request)
    marked = await reads.read_all(runtime.sessions, runtime.states, user_id=path_id(request, "user_id"))
    return JSONResponse({"marked_read": marked, "unread_count": 0})


ROUTES = [
    ApiRoute(
        "GET",
        "/v1/users/{user_id}/inbox",
        list_inbox,
        "A user's inbox",
        "user_or_service",
        query=("status", "archived", "cursor", "limit"),
        responses={200: "A page of inbox messages"},
        tag="inbox",
    ),
    ApiRoute(
        "POST",
        "/v1/users/{user_id}/inbox/read-all",
        read_all,
        "Mark every inbox message read",
        "user_or_service",
        responses={200: "How many were marked"},
        tag="inbox",
    ),
    ApiRoute(
        "POST",
        "/v1/users/{user_id}/inbox/{message_id}/read",
        mark_read,
        "Mark an inbox message read",
        "user_or_service",
        responses={200: "The message"},
        tag="inbox",
    ),
    ApiRoute(
        "POST",
        "/v1/users/{user_id}/inbox/{message_id}/unread",
        mark_unread,
        "Mark an inbox message unread",
        "user_or_service",
        responses={200: "The message"},
        tag="inbox",
    ),
    ApiRoute(
        "POST",
        "/v1/users/{user_id}/inbox/{message_id}/archive",
        archive,
        "Archive an inbox message",
        "user_or_service",
        responses={200: "The message"},
        tag="inbox",
    ),
]
