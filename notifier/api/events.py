"""Events: ingest (API key or QStash signature), preview, read back, and the catalog."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.auth import principal_of
from notifier.api.common import (
    ApiRoute,
    collect,
    encode_cursor,
    parse_json,
    path_uuid,
    query_page,
    query_since,
    query_text,
    read_body,
    read_json,
    refuse_if,
    runtime_of,
)
from notifier.api.deliveries import delivery_summary
from notifier.db import delivery_reads, events
from notifier.db.events import EventDelivery
from notifier.db.models import EVENTS, Event, string_length
from notifier.errors import FieldError, NotFound, RequestError, ValidationFailed
from notifier.ingest.schemas import EventIn
from notifier.runtime import Runtime
from notifier.types import text_problem

# The columns a QStash message id and a type filter are compared with or stored in.
MESSAGE_ID_LIMIT = string_length(EVENTS.c.source_message_id)
TYPE_LIMIT = string_length(EVENTS.c.type)


def accepted_delivery(delivery: EventDelivery) -> dict[str, Any]:
    """A delivery as the answer to ``POST /v1/events`` shows it."""
    return {
        "id": str(delivery.id),
        "user_id": delivery.user_id,
        "channel": delivery.channel,
        "status": delivery.status,
        "reason": delivery.reason,
        "not_before": delivery.not_before.isoformat() if delivery.not_before else None,
    }


async def post_event(request: Request) -> Response:
    from_qstash = principal_of(request).kind == "qstash"
    body = parse_json(await read_body(request), request.headers.get("content-type"))
    message_id = request.headers.get("upstash-message-id") if from_qstash else None
    if message_id is not None and (problem := text_problem(message_id, longest=MESSAGE_ID_LIMIT)) is not None:
        raise ValidationFailed([FieldError(("header", "Upstash-Message-Id"), problem)])
    return await accept(runtime_of(request), body, source="qstash" if from_qstash else "api", message_id=message_id)


async def accept(runtime: Runtime, body: Any, *, source: str, message_id: str | None = None) -> Response:
    """Accept an event body and dispatch its deliveries; the answer of ``POST /v1/events``."""
    try:
        accepted = await runtime.intake.accept(body, source=source, source_message_id=message_id)
    except RequestError:
        runtime.metrics.events.labels(type=_type_label(runtime, body), outcome="rejected").inc()
        raise
    runtime.metrics.events.labels(
        type=_type_label(runtime, body), outcome="duplicate" if accepted.duplicate else "accepted"
    ).inc()
    await runtime.dispatcher.dispatch(accepted.dispatch)
    answer = {
        "event_id": str(accepted.event_id),
        "duplicate": accepted.duplicate,
        "deliveries": [accepted_delivery(d) for d in accepted.deliveries],
    }
    return JSONResponse(answer, status_code=200 if accepted.duplicate else 202)


def _type_label(runtime: Runtime, body: object) -> str:
    """The event's type as a metric label: a catalog type, else ``unknown``.

    /metrics is public, so a label value is never what a caller sent: each distinct value would be a new time
    series, kept for the life of the process.
    """
    sent = body.get("type") if isinstance(body, dict) else None
    return sent if isinstance(sent, str) and runtime.catalog.get(sent) is not None else "unknown"


async def preview(request: Request) -> Response:
    planned = await runtime_of(request).intake.preview(await read_json(request))
    return JSONResponse(
        {
            "type": planned.type,
            "recipients": planned.recipients,
            "plan": [
                {
                    "user_id": d.user_id,
                    "channel": str(d.channel),
                    "status": str(d.status) if d.status else "none",
                    "reason": str(d.reason) if d.reason else None,
                    "not_before": d.not_before.isoformat() if d.not_before else None,
                    "source": d.source,
                    "explanation": d.explanation,
                }
                for d in planned.decisions
            ],
        }
    )


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


async def get_event(request: Request) -> Response:
    event_id = path_uuid(request, "event_id")
    async with runtime_of(request).sessions() as session:
        event = await events.get(session, event_id)
        if event is None:
            raise NotFound(f"event '{event_id}' not found")
        found = await delivery_reads.of_event(session, event_id=event_id)
    # ``attempts`` (the count) is deprecated: the same number is ``attempt_count``, as in /v1/deliveries.
    shown = [{**delivery_summary(d), "attempts": d.attempts} for d in found]
    return JSONResponse({**event_public(event), "deliveries": shown})


async def list_events(request: Request) -> Response:
    errors: list[FieldError] = []
    limit, cursor = query_page(request, errors)
    since = collect(errors, lambda: query_since(request), None)
    event_type = None
    if request.query_params.get("type"):  # an empty type filters nothing
        event_type = collect(errors, lambda: query_text(request, "type", longest=TYPE_LIMIT), None)
    refuse_if(errors)
    async with runtime_of(request).sessions() as session:
        shown, following = await events.page(session, type=event_type, since=since, cursor=cursor, limit=limit)
    next_cursor = encode_cursor(*following) if following else None
    return JSONResponse({"data": [event_public(e) for e in shown], "next_cursor": next_cursor})


async def event_types(request: Request) -> Response:
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
