"""Events: ingest (API key or QStash signature), preview, read back, and the catalog."""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.common import (
    ApiRoute,
    decode_cursor,
    encode_cursor,
    parse_json,
    path_uuid,
    query_limit,
    query_since,
    read_body,
    read_json,
    require_service,
    runtime_of,
)
from notifier.errors import NotFound, RequestError
from notifier.ingest import EventIn, accept_event, delivery_public, preview_event
from notifier.models import Delivery, Event


async def post_event(request: Request) -> Response:
    runtime = runtime_of(request)
    signature = request.headers.get("upstash-signature")
    message_id: str | None = None
    if signature is not None:
        raw = await read_body(request)
        runtime.qstash.verify(signature, raw, path=request.url.path, query=request.url.query)
        message_id = request.headers.get("upstash-message-id")
        body = parse_json(raw, request.headers.get("content-type"))
    else:
        require_service(request)
        body = await read_json(request)
    try:
        accepted = await accept_event(
            runtime, body, source="qstash" if signature else "api", source_message_id=message_id
        )
    except RequestError:
        runtime.metrics.events.labels(type=_type_label(body), outcome="rejected").inc()
        raise
    runtime.metrics.events.labels(
        type=_type_label(body), outcome="duplicate" if accepted.duplicate else "accepted"
    ).inc()
    for delivery in [] if accepted.duplicate else accepted.deliveries:
        runtime.metrics.delivery_status(delivery["channel"], delivery["status"], delivery["reason"])
    await runtime.dispatcher.dispatch(accepted.dispatch)
    return JSONResponse(accepted.public(), status_code=200 if accepted.duplicate else 202)


def _type_label(body: object) -> str:
    runtime_type = body.get("type") if isinstance(body, dict) else None
    return runtime_type if isinstance(runtime_type, str) and len(runtime_type) <= 100 else "invalid"


async def preview(request: Request) -> Response:
    require_service(request)
    return JSONResponse(await preview_event(runtime_of(request), await read_json(request)))


async def get_event(request: Request) -> Response:
    require_service(request)
    event_id = path_uuid(request, "event_id")
    async with runtime_of(request).sessions() as session:
        event = await session.get(Event, event_id)
        if event is None:
            raise NotFound(f"event '{event_id}' not found")
        rows = await session.execute(
            sa.select(Delivery).where(col(Delivery.event_id) == event_id).order_by(Delivery.user_id, Delivery.channel)
        )
        deliveries = [
            {
                **delivery_public(d),
                "attempts": d.attempts,
                "provider": d.provider,
                "sent_at": d.sent_at.isoformat() if d.sent_at else None,
                "last_error": d.last_error,
            }
            for d in rows.scalars()
        ]
    return JSONResponse({**event_public(event), "deliveries": deliveries})


def event_public(event: Event) -> dict[str, object]:
    return {
        "id": str(event.id),
        "type": event.type,
        "idempotency_key": event.idempotency_key,
        "organization_id": event.organization_id,
        "actor": event.actor,
        "data": event.data,
        "recipients": event.recipients,
        "send_at": event.send_at.isoformat() if event.send_at else None,
        "source": event.source,
        "received_at": event.received_at.isoformat(),
    }


async def list_events(request: Request) -> Response:
    require_service(request)
    limit, since, cursor = query_limit(request), query_since(request), decode_cursor(request)
    statement = sa.select(Event).order_by(col(Event.received_at).desc(), col(Event.id).desc()).limit(limit + 1)
    if event_type := request.query_params.get("type"):
        statement = statement.where(col(Event.type) == event_type)
    if since is not None:
        statement = statement.where(col(Event.received_at) >= since)
    if cursor is not None:
        statement = statement.where(sa.tuple_(col(Event.received_at), col(Event.id)) < sa.tuple_(*cursor))
    async with runtime_of(request).sessions() as session:
        events = list((await session.execute(statement)).scalars())
    page, more = events[:limit], len(events) > limit
    next_cursor = encode_cursor(page[-1].received_at, page[-1].id) if more else None
    return JSONResponse({"data": [event_public(e) for e in page], "next_cursor": next_cursor})


async def event_types(request: Request) -> Response:
    require_service(request)
    catalog = runtime_of(request).catalog
    return JSONResponse({"data": [catalog.types[name].public() for name in sorted(catalog.types)]})


ROUTES = [
    ApiRoute(
        "POST",
        "/v1/events",
        post_event,
        "Accept a domain event",
        "service_or_qstash",
        body=EventIn,
        responses={200: "Duplicate of an earlier event", 202: "Accepted"},
        tag="events",
    ),
    ApiRoute(
        "POST",
        "/v1/events/preview",
        preview,
        "Plan an event without storing or sending",
        "service",
        body=EventIn,
        responses={200: "The plan"},
        tag="events",
    ),
    ApiRoute(
        "GET",
        "/v1/events",
        list_events,
        "List events",
        "service",
        query=("type", "since", "cursor", "limit"),
        responses={200: "A page of events"},
        tag="events",
    ),
    ApiRoute(
        "GET",
        "/v1/events/{event_id}",
        get_event,
        "An event and its deliveries",
        "service",
        responses={200: "The event"},
        tag="events",
    ),
    ApiRoute(
        "GET",
        "/v1/event-types",
        event_types,
        "The event catalog",
        "service",
        responses={200: "The catalog"},
        tag="events",
    ),
]
