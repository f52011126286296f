"""The routes QStash calls: one delivery attempt, the failure callback, and the two cron jobs.

Every route is ``auth="qstash"``: ``Upstash-Signature`` is verified over the raw body and this URL before
anything is done (401 otherwise). Each finishes all of its work -- including publishing follow-up
deliveries -- before it answers: in QStash mode nothing runs after a response.

The answers are QStash's protocol, built here rather than raised as errors: 200 means done (also
"already done" and "nothing to do"); 503 with ``Retry-After`` means try again then; 489 with
``Upstash-NonRetryable-Error: true`` means never retry (the failure is recorded).

Two retry budgets exist and may disagree: QStash's (``Upstash-Retries``, published as
NOTIFIER_MAX_RETRIES but fixed per message when it is published) and the runner's (the delivery
fails after 1 + NOTIFIER_MAX_RETRIES attempts, counted in the database). Whichever runs out first
ends the delivery as ``failed``/``retries_exhausted`` with its fallback planned exactly once: ours
first -> the attempt answers 489, QStash stops and its failure callback finds a terminal row (200,
no change); QStash's first (a 503 for ``busy``, a retry count lowered or raised after publishing, a
message re-published by the sweep) -> the failure callback exhausts the delivery.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import math
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.common import ApiRoute, read_body, runtime_of
from notifier.api.problems import problem
from notifier.db import deliveries
from notifier.db.retention import PurgeReport, purge_expired
from notifier.delivery.runner import AttemptReport
from notifier.runtime import Runtime
from notifier.types import DispatchItem, utcnow

log = logging.getLogger("notifier.api.qstash")

NON_RETRYABLE = {"Upstash-NonRetryable-Error": "true"}
DETAIL_LIMIT = 300
_DELIVERY_PATH = re.compile(r"/v1/qstash/deliveries/([^/]+)/?$")
SWEEP_LIMIT = 500
"""Deliveries re-dispatched per sweep call."""
SWEEP_GRACE = dt.timedelta(seconds=30)
"""How long a pending row must have been due before the sweep calls it stuck.

Rows being published right now (fresh, ``not_before`` NULL) and rows QStash is about to deliver at
their ``not_before`` (deferred sends, retries steered by ``Retry-After``) are not doubled.
"""


def _retry_after(seconds: float | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": str(max(0, math.ceil(seconds)))}


def _summary(report: AttemptReport) -> dict[str, Any]:
    return {
        "delivery_id": str(report.delivery_id),
        "outcome": report.kind,
        "status": report.status,
        "reason": report.reason,
    }


async def _dispatch_follow_up(runtime: Runtime, report: AttemptReport) -> None:
    # Before the answer: once QStash has its response this function may be frozen or gone.
    if report.follow_up:
        await runtime.dispatcher.dispatch(report.follow_up)


async def attempt_delivery(request: Request) -> Response:
    """Attempt one delivery for QStash and answer in QStash's terms (200 / 503 + Retry-After / 489)."""
    runtime = runtime_of(request)
    raw_id = request.path_params["delivery_id"]
    retried = request.headers.get("upstash-retried", "0")[:10]
    try:
        delivery_id = uuid.UUID(raw_id)
    except ValueError:
        # Signed by QStash for a URL we never publish: retrying cannot make it exist.
        log.warning("qstash delivery call for %r, which is not a delivery id; acknowledged", raw_id[:100])
        return JSONResponse({"delivery_id": raw_id[:100], "outcome": "missing", "status": None, "reason": None})
    report = await runtime.runner.attempt(delivery_id, via="qstash")
    await _dispatch_follow_up(runtime, report)
    body = {**_summary(report), "qstash_retried": retried}
    if report.kind in ("retry", "busy"):
        title = "Retry later" if report.kind == "retry" else "Delivery is being attempted"
        detail = report.detail[:DETAIL_LIMIT] or "another attempt holds this delivery"
        return problem(503, title, detail, headers=_retry_after(report.retry_after))
    if report.kind == "failed":
        detail = f"{report.reason}: {report.detail[:DETAIL_LIMIT]}" if report.detail else str(report.reason)
        return problem(489, "Delivery failed permanently", detail, headers=NON_RETRYABLE)
    if report.kind in ("missing", "lost"):
        # missing: deleted (retention) since it was published. lost: an attempt that outlived its lease
        # was taken over; the attempt that took it over records the outcome and answers its own message.
        log.info("qstash delivery %s acknowledged: %s", delivery_id, report.kind)
    return JSONResponse(body)


def delivery_id_from_callback(report: Mapping[str, Any]) -> uuid.UUID | None:
    """The delivery a failure callback is about: from ``url`` (…/v1/qstash/deliveries/{id}), else from the
    base64 ``sourceBody`` (``{"delivery_id": …}``); None if neither names one."""
    url = report.get("url")
    if isinstance(url, str) and (match := _DELIVERY_PATH.search(urllib.parse.urlsplit(url).path)):
        try:
            return uuid.UUID(match.group(1))
        except ValueError:
            pass
    source = report.get("sourceBody")
    if isinstance(source, str):
        try:
            original = json.loads(base64.b64decode(source, validate=True))
            return uuid.UUID(str(original["delivery_id"])) if isinstance(original, dict) else None
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
    return None


def _callback_note(report: Mapping[str, Any]) -> str:
    message_id = report.get("sourceMessageId") or report.get("sourceMessasgeId")  # older QStash spelling
    return (
        f"QStash gave up: last status {report.get('status')}, retried {report.get('retried')} "
        f"of {report.get('maxRetries')}; message {message_id}, dlq {report.get('dlqId')}"
    )[:500]


async def failure_callback(request: Request) -> Response:
    """QStash's failure callback: the delivery becomes failed/retries_exhausted and its fallback is dispatched.

    An unparseable or unrelated callback is acknowledged (200) with a warning: it is signed by
    QStash, so it is not an attack, and its content cannot change on a retry -- a 4xx would only
    make QStash repeat it for hours. The delivery itself is not lost: a row still pending is
    re-dispatched by the sweep and ends within the runner's own retry budget.
    """
    raw = await read_body(request)
    runtime = runtime_of(request)
    try:
        report = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        report = None
    delivery_id = delivery_id_from_callback(report) if isinstance(report, dict) else None
    if delivery_id is None or not isinstance(report, dict):
        url = report.get("url") if isinstance(report, dict) else None
        log.warning("qstash failure callback names no delivery (url %r); acknowledged and ignored", str(url)[:200])
        return JSONResponse({"delivery_id": None, "outcome": "ignored", "status": None, "reason": None})
    outcome = await runtime.runner.exhaust(delivery_id, note=_callback_note(report))
    if outcome.kind == "busy":
        # An attempt is sending right now (QStash stopped waiting for it): let its outcome land first.
        return problem(
            503,
            "Delivery is being attempted",
            "an attempt holds this delivery",
            headers=_retry_after(outcome.retry_after),
        )
    await _dispatch_follow_up(runtime, outcome)
    log.info(
        "qstash failure callback for delivery %s: %s",
        delivery_id,
        outcome.kind,
        extra={"delivery_id": str(delivery_id), "status": outcome.status, "reason": outcome.reason},
    )
    return JSONResponse({**_summary(outcome), "follow_up": [str(i.delivery_id) for i in outcome.follow_up]})


async def sweep(request: Request) -> Response:
    """Re-dispatch deliveries stuck past due (pending rows QStash never got, sending rows whose lease expired)."""
    runtime = runtime_of(request)
    async with runtime.sessions() as session:
        stuck = await deliveries.find_stuck(session, now=utcnow(), grace=SWEEP_GRACE, limit=SWEEP_LIMIT)
    # Safe to publish again: QStash dedupes by delivery id for 10 minutes, and after that the
    # delivery route answers a terminal row with 200 without calling a provider.
    published = await runtime.dispatcher.dispatch([DispatchItem(delivery_id) for delivery_id, _ in stuck])
    by_status = {s: sum(1 for _, status in stuck if status == s) for s in ("queued", "deferred", "sending")}
    if stuck:
        log.info("sweep re-dispatched %d of %d stuck deliveries", published, len(stuck), extra=by_status)
    return JSONResponse({"found": len(stuck), "published": published, **by_status, "more": len(stuck) >= SWEEP_LIMIT})


async def retention(request: Request) -> Response:
    """Delete events (with their deliveries) and read inbox messages older than NOTIFIER_RETENTION_DAYS."""
    runtime = runtime_of(request)
    cutoff = utcnow() - dt.timedelta(days=runtime.settings.retention_days)
    report = purge_public(await purge_expired(sessions=runtime.sessions, cutoff=cutoff))
    log.info("retention purge: %s", report)
    return JSONResponse(report)


def purge_public(report: PurgeReport) -> dict[str, Any]:
    """What a retention run deleted, as the cron route and ``notifier retention`` print it."""
    return {
        "cutoff": report.cutoff.isoformat(),
        "events_deleted": report.events,
        "deliveries_deleted": report.deliveries,
        "inbox_messages_deleted": report.inbox_messages,
        "preference_changes_deleted": report.preference_changes,
        "more": report.more,
    }


ROUTES = [
    ApiRoute(
        "POST",
        "/v1/qstash/deliveries/{delivery_id}",
        attempt_delivery,
        "Attempt one delivery (QStash)",
        "qstash",
        responses={
            200: "Sent, already terminal, suppressed or gone",
            489: "Failed permanently (recorded); Upstash-NonRetryable-Error: true",
            503: "Retry after Retry-After seconds",
        },
        tag="qstash",
    ),
    ApiRoute(
        "POST",
        "/v1/qstash/failures",
        failure_callback,
        "QStash failure callback: the delivery failed (retries_exhausted); fallback planned",
        "qstash",
        responses={200: "Recorded (or nothing to do)", 503: "An attempt is in flight; retry after Retry-After"},
        tag="qstash",
    ),
    ApiRoute(
        "POST",
        "/v1/qstash/cron/sweep",
        sweep,
        "Re-dispatch deliveries stuck past due (QStash schedule)",
        "qstash",
        responses={200: "Counts of what was found and published"},
        tag="qstash",
    ),
    ApiRoute(
        "POST",
        "/v1/qstash/cron/retention",
        retention,
        "Delete events, deliveries and read inbox items older than NOTIFIER_RETENTION_DAYS (QStash schedule)",
        "qstash",
        responses={200: "Counts of what was deleted"},
        tag="qstash",
    ),
]
