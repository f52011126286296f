"""The routes QStash calls: a delivery's attempt, a send group's attempt, the failure callback, the cron jobs.

Every route is ``auth="qstash"``: ``Upstash-Signature`` is verified over the raw body and this URL before
anything is done (401 otherwise), and is good for one request (a replay is a 401 that changes nothing). The
attempt routes spend it in the claim (``spends_signature``; the runner's ``spend``) rather than in a transaction
of its own before the handler, so an attempt callback writes twice, not three times: the cost of a QStash
delivery is mostly its transactions (on PostgreSQL the claim and the outcome are usually one statement each).
The failure callback and the cron jobs are rarer and keep ``guard``'s own transaction. Each finishes all of its
work -- including publishing follow-up deliveries -- before it answers: in QStash mode nothing runs after a
response.

The answers are QStash's protocol, built here rather than raised as errors: 200 means done (also "already
done", "nothing to do" and "a newer message of this delivery exists"); 503 with ``Retry-After`` means try
again then; 489 with ``Upstash-NonRetryable-Error: true`` means never retry (the failure is recorded). A
send group's message answers for all of its members: 503 while any of them should be tried again, 489 when
every one failed for good, else 200.

Two retry budgets exist and may disagree: QStash's (``Upstash-Retries``, published as NOTIFIER_MAX_RETRIES
but fixed per message when it is published) and the runner's (the delivery fails after 1 +
NOTIFIER_MAX_RETRIES attempts, counted in the database). Whichever runs out first ends the delivery as
``failed``/``retries_exhausted`` with its fallback planned exactly once: ours first -> the attempt answers
489, QStash stops and its failure callback finds a terminal row (200, no change); QStash's first -> the
failure callback exhausts a pending delivery, or -- while an attempt holds it -- records that QStash gave up,
and the sweep re-dispatches it as a new dispatch generation if that attempt does not finish it
(``notifier.delivery.recovery``).
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
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.auth import signature_spender
from notifier.api.common import ApiRoute, read_body, runtime_of
from notifier.api.problems import problem
from notifier.db.retention import PurgeReport, purge_expired
from notifier.delivery.outcomes import AttemptReport
from notifier.runtime import Runtime
from notifier.types import utcnow

log = logging.getLogger("notifier.api.qstash")

NON_RETRYABLE = {"Upstash-NonRetryable-Error": "true"}
DETAIL_LIMIT = 300
_UNIT_PATH = re.compile(r"/v1/qstash/(deliveries|groups)/([^/]+)/?$")
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


async def _dispatch_follow_up(runtime: Runtime, reports: Sequence[AttemptReport]) -> None:
    # Before the answer: once QStash has its response this function may be frozen or gone.
    follow_up = [item for report in reports for item in report.follow_up]
    if follow_up:
        await runtime.dispatcher.dispatch(follow_up)


def _generation(raw: bytes) -> int | None:
    """The dispatch generation a message's body names (None: a message published before generations)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return _integer(body.get("generation")) if isinstance(body, dict) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _answer(reports: Sequence[AttemptReport], unit: str, retried: str) -> Response:
    """QStash's answer for the attempt of one unit (a delivery, or a group's members)."""
    again = [r for r in reports if r.kind in ("retry", "busy")]
    if again:
        first = again[0]
        title = "Retry later" if first.kind == "retry" else "Delivery is being attempted"
        detail = first.detail[:DETAIL_LIMIT] or "another attempt holds this delivery"
        waits = [r.retry_after for r in again if r.retry_after is not None]
        return problem(503, title, detail, headers=_retry_after(max(waits) if waits else None))
    if reports and all(r.kind == "failed" for r in reports):
        first = reports[0]
        detail = f"{first.reason}: {first.detail[:DETAIL_LIMIT]}" if first.detail else str(first.reason)
        return problem(489, "Delivery failed permanently", detail, headers=NON_RETRYABLE)
    for report in reports:
        if report.kind in ("missing", "lost", "superseded"):
            # missing: deleted (retention) since it was published. lost: an attempt that outlived its lease was
            # taken over; the one that took it over records the outcome. superseded: a newer message exists.
            log.info("qstash message for %s acknowledged: %s", unit, report.kind)
    summaries = [_summary(r) for r in reports]
    body = {**summaries[0], "qstash_retried": retried} if len(summaries) == 1 else {"deliveries": summaries}
    return JSONResponse({**body, "qstash_retried": retried})


def _uuid(raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


async def attempt_delivery(request: Request) -> Response:
    """Attempt one delivery (with its send group, if it is in one) for QStash; answer in QStash's terms."""
    return await _attempt(request, "delivery_id")


async def attempt_group(request: Request) -> Response:
    """Attempt a send group's members with one provider call for QStash; answer in QStash's terms."""
    return await _attempt(request, "group_id")


async def _attempt(request: Request, parameter: str) -> Response:
    runtime = runtime_of(request)
    raw_id = request.path_params[parameter]
    retried = request.headers.get("upstash-retried", "0")[:10]
    unit = _uuid(raw_id)
    if unit is None:
        # Signed by QStash for a URL we never publish: retrying cannot make it exist. (guard spends the signature.)
        log.warning("qstash call for %r, which is not an id; acknowledged", raw_id[:100])
        return JSONResponse({"delivery_id": raw_id[:100], "outcome": "missing", "status": None, "reason": None})
    generation, spend = _generation(await read_body(request)), signature_spender(request)
    if parameter == "group_id":
        reports = await runtime.runner.attempt_group(unit, via="qstash", generation=generation, spend=spend)
    else:
        reports = await runtime.runner.attempt(unit, via="qstash", generation=generation, spend=spend)
    await _dispatch_follow_up(runtime, reports)
    return _answer(reports, str(unit), retried)


def unit_from_callback(report: Mapping[str, Any]) -> tuple[uuid.UUID | None, uuid.UUID | None, int | None]:
    """What a failure callback is about: (delivery id, send group id, generation), from the message's
    ``url`` (…/v1/qstash/deliveries/{id} or …/groups/{id}) and its base64 ``sourceBody``. Neither id when
    it names none."""
    delivery_id = send_group = None
    url = report.get("url")
    if isinstance(url, str) and (match := _UNIT_PATH.search(urllib.parse.urlsplit(url).path)):
        found = _uuid(match.group(2))
        delivery_id, send_group = (found, None) if match.group(1) == "deliveries" else (None, found)
    original: Any = None
    source = report.get("sourceBody")
    if isinstance(source, str):
        try:
            original = json.loads(base64.b64decode(source, validate=True))
        except (binascii.Error, ValueError):
            original = None
    if not isinstance(original, dict):
        original = {}
    if delivery_id is None and send_group is None:
        delivery_id = _uuid(str(original.get("delivery_id", "")))
        send_group = _uuid(str(original.get("group_id", ""))) if delivery_id is None else None
    generation = original.get("generation")
    return (
        delivery_id,
        send_group,
        generation if isinstance(generation, int) and not isinstance(generation, bool) else None,
    )


def _callback_note(report: Mapping[str, Any]) -> str:
    message_id = report.get("sourceMessageId") or report.get("sourceMessasgeId")  # older QStash spelling
    return (
        f"QStash gave up: last status {report.get('status')}, retried {report.get('retried')} "
        f"of {report.get('maxRetries')}; message {message_id}, dlq {report.get('dlqId')}"
    )[:500]


async def failure_callback(request: Request) -> Response:
    """QStash's failure callback: pending deliveries fail retries_exhausted (fallbacks dispatched); deliveries an
    attempt holds get QStash's giving up recorded. Always 200: QStash has nothing to retry.

    An unparseable or unrelated callback is acknowledged with a warning: it is signed by QStash, so it is
    not an attack, and its content cannot change on a retry -- a 4xx would only make QStash repeat it for
    hours. The deliveries themselves are not lost: a row still pending is re-dispatched by the sweep.
    """
    raw = await read_body(request)
    runtime = runtime_of(request)
    try:
        report = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        report = None
    delivery_id, send_group, generation = unit_from_callback(report) if isinstance(report, dict) else (None,) * 3
    if not isinstance(report, dict) or (delivery_id is None and send_group is None):
        url = report.get("url") if isinstance(report, dict) else None
        log.warning("qstash failure callback names no delivery (url %r); acknowledged and ignored", str(url)[:200])
        return JSONResponse({"delivery_id": None, "outcome": "ignored", "status": None, "reason": None})
    outcomes = await runtime.recovery.gave_up(
        delivery_id=delivery_id, send_group=send_group, generation=generation, note=_callback_note(report)
    )
    await _dispatch_follow_up(runtime, outcomes)
    unit = str(delivery_id or send_group)
    log.info("qstash failure callback for %s: %s", unit, ", ".join(sorted({o.kind for o in outcomes})))
    follow_up = [str(item.delivery_id) for outcome in outcomes for item in outcome.follow_up]
    summaries = [_summary(o) for o in outcomes]
    body = summaries[0] if delivery_id is not None and len(summaries) == 1 else {"deliveries": summaries}
    return JSONResponse({**body, "follow_up": follow_up})


async def sweep(request: Request) -> Response:
    """Re-dispatch deliveries stuck past due: pending rows QStash never got, ``sending`` rows whose lease
    expired, rows whose message QStash gave up on (see ``notifier.delivery.recovery``)."""
    runtime = runtime_of(request)
    swept = await runtime.recovery.sweep(grace=SWEEP_GRACE, limit=SWEEP_LIMIT)
    published = await runtime.dispatcher.dispatch(swept.dispatch)
    found = sum(swept.found.values())
    if found:
        log.info("sweep re-dispatched %d messages for %d stuck deliveries", published, found, extra=swept.found)
    answer = {"found": found, "messages": len(swept.dispatch), "published": published, **swept.found}
    return JSONResponse({**answer, "more": found >= SWEEP_LIMIT})


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
            200: "Sent, already terminal, suppressed, gone, or a newer message exists",
            489: "Failed permanently (recorded); Upstash-NonRetryable-Error: true",
            503: "Retry after Retry-After seconds",
        },
        tag="qstash",
        spends_signature=True,
    ),
    ApiRoute(
        "POST",
        "/v1/qstash/groups/{group_id}",
        attempt_group,
        "Attempt a send group's members with one provider call (QStash)",
        "qstash",
        responses={
            200: "Done for every member (sent, terminal, suppressed), or a newer message exists",
            489: "Every member failed permanently (recorded); Upstash-NonRetryable-Error: true",
            503: "A member should be tried again after Retry-After seconds",
        },
        tag="qstash",
        spends_signature=True,
    ),
    ApiRoute(
        "POST",
        "/v1/qstash/failures",
        failure_callback,
        "QStash failure callback: pending deliveries fail (retries_exhausted, fallback planned); held ones noted",
        "qstash",
        responses={200: "Recorded (or nothing to do)"},
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
