"""Deliveries: filtered listing with cursor pagination, the attempt timeline, and operator retry.

The filter parser, the serializers and ``retry_delivery`` are shared with the dashboard, so the JSON API and
the HTML pages can never disagree about what a filter means or how a delivery looks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.common import (
    ApiRoute,
    collect,
    encode_cursor,
    path_uuid,
    query_page,
    query_since,
    refuse_if,
    runtime_of,
)
from notifier.db import delivery_reads
from notifier.db.delivery_reads import DeliveryFilters, DeliveryHistory
from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition
from notifier.errors import FieldError, NotFound
from notifier.runtime import Runtime
from notifier.types import ChannelName, DeliveryStatus, text_problem

STATUSES = tuple(str(s) for s in DeliveryStatus)
CHANNELS = tuple(str(c) for c in ChannelName)
FILTERS = ("user_id", "event_id", "status", "channel", "type")


def parse_filters(params: Mapping[str, str], errors: list[FieldError]) -> DeliveryFilters:
    """Return the user_id, event_id, status, channel and type filters in ``params``; append problems to ``errors``."""
    status, channel = params.get("status"), params.get("channel")
    if status is not None and status not in STATUSES:
        errors.append(FieldError(("query", "status"), f"unknown status '{status}' (known: {', '.join(STATUSES)})"))
        status = None
    if channel is not None and channel not in CHANNELS:
        errors.append(FieldError(("query", "channel"), f"unknown channel '{channel}' (known: {', '.join(CHANNELS)})"))
        channel = None
    event_id: uuid.UUID | None = None
    if (raw_event := params.get("event_id")) is not None:
        try:
            event_id = uuid.UUID(raw_event)
        except ValueError:
            errors.append(FieldError(("query", "event_id"), f"'{raw_event[:60]}' is not an event id (a UUID)"))
    # Filters, not paths: a user id stored before ids had to be path segments can still be looked up.
    for name, longest in (("user_id", 200), ("type", 100)):
        value = params.get(name)
        if value is not None and (problem := text_problem(value, longest=longest)) is not None:
            errors.append(FieldError(("query", name), problem))
    return DeliveryFilters(
        user_id=params.get("user_id"), event_id=event_id, status=status, channel=channel, type=params.get("type")
    )


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def delivery_summary(delivery: Delivery) -> dict[str, Any]:
    """A delivery as every listing shows it (the API, the dashboard, an event's deliveries)."""
    return {
        "id": str(delivery.id),
        "event_id": str(delivery.event_id),
        "event_type": delivery.event_type,
        "user_id": delivery.user_id,
        "channel": delivery.channel,
        "provider": delivery.provider,
        "status": delivery.status,
        "reason": delivery.reason,
        "not_before": _iso(delivery.not_before),
        "attempt_count": delivery.attempts,
        "provider_message_id": delivery.provider_message_id,
        "last_error": delivery.last_error,
        "fallback_of": str(delivery.fallback_of) if delivery.fallback_of else None,
        "send_group": str(delivery.send_group) if delivery.send_group else None,
        "created_at": delivery.created_at.isoformat(),
        "updated_at": delivery.updated_at.isoformat(),
        "sent_at": _iso(delivery.sent_at),
    }


def attempt_public(attempt: DeliveryAttempt) -> dict[str, Any]:
    finished = attempt.finished_at
    duration = (finished - attempt.started_at).total_seconds() * 1000 if finished else None
    return {
        "number": attempt.number,
        "started_at": attempt.started_at.isoformat(),
        "finished_at": _iso(finished),
        "duration_ms": round(duration, 1) if duration is not None else None,
        "outcome": attempt.outcome,
        "http_status": attempt.http_status,
        "provider_message_id": attempt.provider_message_id,
        "error": attempt.error,
        "via": attempt.via,
        "send_group": str(attempt.send_group) if attempt.send_group else None,
    }


def transition_public(transition: DeliveryTransition) -> dict[str, Any]:
    return {
        "from": transition.from_status,
        "to": transition.to_status,
        "reason": transition.reason,
        "note": transition.note,
        "at": transition.at.isoformat(),
    }


async def delivery_detail(runtime: Runtime, delivery_id: uuid.UUID) -> dict[str, Any]:
    """Return the delivery with its attempt timeline and transition history; raise ``NotFound``."""
    async with runtime.sessions() as session:
        found = await delivery_reads.with_history(session, delivery_id)
    if found is None:
        raise NotFound(f"delivery '{delivery_id}' not found")
    return detail_public(found)


def detail_public(found: DeliveryHistory) -> dict[str, Any]:
    return {
        **delivery_summary(found.delivery),
        "attempts": [attempt_public(a) for a in found.attempts],
        "transitions": [transition_public(t) for t in found.transitions],
    }


async def page_of_deliveries(
    runtime: Runtime, filters: DeliveryFilters, *, cursor: tuple[dt.datetime, uuid.UUID] | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of delivery summaries, and the cursor of the next page (None on the last)."""
    async with runtime.sessions() as session:
        shown, following = await delivery_reads.page(session, filters=filters, cursor=cursor, limit=limit)
    return [delivery_summary(d) for d in shown], encode_cursor(*following) if following else None


async def retry_delivery(runtime: Runtime, delivery_id: uuid.UUID) -> dict[str, Any]:
    """Re-queue a failed delivery and hand it to the dispatcher; return its detail.

    Raises ``NotFound`` for an unknown id and ``Conflict`` unless the delivery is ``failed``.
    """
    item, requeued = await runtime.runner.requeue_failed(delivery_id)
    await runtime.dispatcher.dispatch([item])
    return detail_public(requeued)


async def list_deliveries(request: Request) -> Response:
    errors: list[FieldError] = []
    filters = parse_filters(request.query_params, errors)
    since = collect(errors, lambda: query_since(request), None)
    limit, cursor = query_page(request, errors)
    refuse_if(errors)
    filters = dataclasses.replace(filters, since=since)
    shown, next_cursor = await page_of_deliveries(runtime_of(request), filters, cursor=cursor, limit=limit)
    return JSONResponse({"data": shown, "next_cursor": next_cursor})


async def get_delivery(request: Request) -> Response:
    return JSONResponse(await delivery_detail(runtime_of(request), path_uuid(request, "delivery_id")))


async def post_retry(request: Request) -> Response:
    detail = await retry_delivery(runtime_of(request), path_uuid(request, "delivery_id"))
    return JSONResponse(detail, status_code=202)


ROUTES = [
    ApiRoute(
        "GET",
        "/v1/deliveries",
        list_deliveries,
        "List deliveries, newest first",
        "service",
        query=(*FILTERS, "since", "cursor", "limit"),
        responses={200: "A page of deliveries"},
        tag="deliveries",
    ),
    ApiRoute(
        "GET",
        "/v1/deliveries/{delivery_id}",
        get_delivery,
        "A delivery with its attempts and transitions",
        "service",
        responses={200: "The delivery"},
        tag="deliveries",
    ),
    ApiRoute(
        "POST",
        "/v1/deliveries/{delivery_id}/retry",
        post_retry,
        "Retry a failed delivery",
        "service",
        responses={202: "Re-queued; the delivery as it now stands", 409: "The delivery is not failed"},
        tag="deliveries",
    ),
]
