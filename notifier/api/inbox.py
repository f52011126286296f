"""The in-app inbox: list with cursor pagination and unread count; read, unread, archive, read-all."""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier import store
from notifier.api.common import (
    ApiRoute,
    decode_cursor,
    encode_cursor,
    path_uuid,
    query_limit,
    require_user_or_service,
    runtime_of,
)
from notifier.errors import FieldError, NotFound, ValidationFailed
from notifier.inbox import inbox_public
from notifier.models import Delivery, InboxMessage, utcnow
from notifier.types import DeliveryStatus

STATUSES = ("unread", "read", "all")


def _unread(user_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        col(InboxMessage.user_id) == user_id,
        col(InboxMessage.read_at).is_(None),
        col(InboxMessage.archived_at).is_(None),
    )


async def unread_count(session: AsyncSession, user_id: str) -> int:
    result = await session.execute(sa.select(sa.func.count()).select_from(InboxMessage).where(_unread(user_id)))
    return int(result.scalar_one())


async def list_inbox(request: Request) -> Response:
    user_id = request.path_params["user_id"]
    require_user_or_service(request, user_id)
    status = request.query_params.get("status", "all")
    archived = request.query_params.get("archived", "false")
    errors = []
    if status not in STATUSES:
        errors.append(FieldError(("query", "status"), f"must be one of {', '.join(STATUSES)}"))
    if archived not in ("true", "false", "all"):
        errors.append(FieldError(("query", "archived"), "must be true, false or all"))
    if errors:
        raise ValidationFailed(errors)
    limit, cursor = query_limit(request), decode_cursor(request)
    statement = (
        sa.select(InboxMessage)
        .where(col(InboxMessage.user_id) == user_id)
        .order_by(col(InboxMessage.created_at).desc(), col(InboxMessage.id).desc())
        .limit(limit + 1)
    )
    if status == "unread":
        statement = statement.where(col(InboxMessage.read_at).is_(None))
    elif status == "read":
        statement = statement.where(col(InboxMessage.read_at).is_not(None))
    if archived == "false":
        statement = statement.where(col(InboxMessage.archived_at).is_(None))
    elif archived == "true":
        statement = statement.where(col(InboxMessage.archived_at).is_not(None))
    if cursor is not None:
        statement = statement.where(sa.tuple_(col(InboxMessage.created_at), col(InboxMessage.id)) < sa.tuple_(*cursor))
    async with runtime_of(request).sessions() as session:
        items = list((await session.execute(statement)).scalars())
        count = await unread_count(session, user_id)
    page, more = items[:limit], len(items) > limit
    return JSONResponse(
        {
            "data": [inbox_public(item) for item in page],
            "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
            "unread_count": count,
        }
    )


async def _mark_delivery(session: AsyncSession, delivery_id: uuid.UUID | None, *, read: bool, now: dt.datetime) -> None:
    """Keep the in-app delivery's status in step with its inbox item (sent <-> read)."""
    if delivery_id is None:
        return
    delivery = await session.get(Delivery, delivery_id)
    source, target = (DeliveryStatus.sent, DeliveryStatus.read) if read else (DeliveryStatus.read, DeliveryStatus.sent)
    if delivery is None or delivery.status != source:
        return
    delivery.status = target
    delivery.updated_at = now
    move = store.NewTransition(
        delivery_id=delivery.id,
        from_status=source,
        to_status=target,
        note="inbox item read" if read else "inbox item marked unread",
        context={"channel": delivery.channel, "event_id": str(delivery.event_id)},
    )
    await store.record_transitions(session, transitions=[move], at=now)


async def _update_one(request: Request, action: str) -> Response:
    user_id = request.path_params["user_id"]
    require_user_or_service(request, user_id)
    message_id = path_uuid(request, "message_id")
    now = utcnow()
    async with runtime_of(request).sessions() as session, session.begin():
        item = await session.get(InboxMessage, message_id, with_for_update=True)
        if item is None or item.user_id != user_id:
            raise NotFound(f"inbox message '{message_id}' not found")
        if action == "read" and item.read_at is None:
            item.read_at = now
            item.seen_at = item.seen_at or now
            await _mark_delivery(session, item.delivery_id, read=True, now=now)
        elif action == "unread" and item.read_at is not None:
            item.read_at = None
            await _mark_delivery(session, item.delivery_id, read=False, now=now)
        elif action == "archive" and item.archived_at is None:
            item.archived_at = now
        await session.flush()
        body = inbox_public(item)
        body["unread_count"] = await unread_count(session, user_id)
    return JSONResponse(body)


async def mark_read(request: Request) -> Response:
    return await _update_one(request, "read")


async def mark_unread(request: Request) -> Response:
    return await _update_one(request, "unread")


async def archive(request: Request) -> Response:
    return await _update_one(request, "archive")


async def read_all(request: Request) -> Response:
    user_id = request.path_params["user_id"]
    require_user_or_service(request, user_id)
    now = utcnow()
    async with runtime_of(request).sessions() as session, session.begin():
        rows = await session.execute(sa.select(InboxMessage).where(_unread(user_id)).with_for_update())
        items = list(rows.scalars())
        for item in items:
            item.read_at = now
            item.seen_at = item.seen_at or now
            await _mark_delivery(session, item.delivery_id, read=True, now=now)
    return JSONResponse({"marked_read": len(items), "unread_count": 0})


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
