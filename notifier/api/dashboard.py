"""The operations dashboard: server-rendered pages behind the service key.

A browser signs in at ``/dashboard/login`` with the key and gets a session cookie (``api.sessions``); scripts
may send ``Authorization: Bearer <key>`` instead (``auth="dashboard"``, checked by ``api.auth.guard``). Forms
that change state carry a CSRF token bound to the session. Failed sign-ins are counted per client address
(``SignInLimiter``): five within five minutes and the address is answered 429 until the oldest of them is five
minutes old, without its key being checked; and from all addresses together (``failure_caps``).
"""

from __future__ import annotations

import datetime as dt
import functools
import hmac
import logging
import math
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from notifier.api.auth import FORM, viewer_of
from notifier.api.common import DEFAULT_LIMIT, ApiRoute, decode_cursor, path_uuid, read_form, runtime_of
from notifier.api.deliveries import (
    CHANNELS,
    STATUSES,
    delivery_detail,
    page_of_deliveries,
    parse_filters,
    retry_delivery,
)
from notifier.api.failure_caps import client_address
from notifier.api.pages import static_url
from notifier.api.problems import status_for
from notifier.api.sessions import COOKIE, COOKIE_PATH, SESSION_SECONDS, Viewer, issue_session
from notifier.api.signin_limit import SignInRefusal, record_signin, signin_refusal
from notifier.db import revocations
from notifier.db.revocations import CredentialKind
from notifier.db.stats import OUTCOMES, ChannelStats, channel_stats, recent_events
from notifier.errors import (
    Conflict,
    FieldError,
    Forbidden,
    NotFound,
    ValidationFailed,
)
from notifier.types import utcnow

log = logging.getLogger("notifier.dashboard")

TEMPLATES = Path(__file__).resolve().parent.parent / "web" / "templates"
_SAFE_NEXT = re.compile(r"/dashboard(/[A-Za-z0-9/_.-]*)?(\?[A-Za-z0-9=&%_.:+-]*)?")  # fullmatch: "$" takes "\n"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    # Not no-referrer: under it a browser posts this page's forms with "Origin: null", which the Origin check must
    # refuse. same-origin still sends nothing to other sites.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Bar:
    x: int
    y: int
    width: int
    css: str
    title: str
    value: int


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bar_height: int
    label_x: int
    bars: list[Bar]
    labels: list[tuple[str, int]]  # (channel, baseline y)


def bar_chart(channels: list[ChannelStats], *, plot: int = 360, label: int = 70, bar: int = 14) -> Chart:
    """Geometry of a grouped horizontal bar chart (sent, failed, suppressed per channel), drawn as inline SVG."""
    top = max((getattr(c, s) for c in channels for s in OUTCOMES), default=0) or 1
    bars, labels, y = [], [], 8
    for stats in channels:
        labels.append((stats.channel, y + (3 * bar + 8) // 2 + 4))
        for status in OUTCOMES:
            value = getattr(stats, status)
            width = max(round(plot * value / top), 1 if value else 0)
            bars.append(Bar(label, y, width, f"bar-{status}", f"{stats.channel} {status}: {value}", value))
            y += bar + 4
        y += 14
    return Chart(width=label + plot + 60, height=y, bar_height=bar, label_x=label - 8, bars=bars, labels=labels)


@functools.cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = lambda iso: iso.replace("T", " ")[:19] + " UTC" if iso else "—"
    env.globals.update(static_url=static_url, statuses=STATUSES, channels=CHANNELS)
    return env


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("csrf", None)
    html = _templates().get_template(f"dashboard/{name}").render(**context)
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def check_csrf(seen: Viewer, form: Mapping[str, str]) -> None:
    if seen.csrf is not None and not hmac.compare_digest(form.get("csrf", "").encode(), seen.csrf.encode()):
        raise Forbidden("the form's CSRF token does not belong to this session; reload the page")


def _safe_next(value: str | None) -> str:
    return value if value and _SAFE_NEXT.fullmatch(value) else "/dashboard"


def _locked_out(refusal: SignInRefusal) -> str:
    """What the login page says to a sign-in that was not checked."""
    seconds = refusal.seconds
    amount, unit = (seconds, "second") if seconds < 60 else (math.ceil(seconds / 60), "minute")
    wait = f"{amount} {unit}{'s' if amount != 1 else ''}"
    source = "from all addresses in the last minute" if refusal.everyone else "from this address"
    return f"Too many failed sign-ins {source}, so this one was not checked. Try again in {wait}."


async def login_page(request: Request) -> Response:
    return render("login.html", next=_safe_next(request.query_params.get("next")), error=None, key_invalid=False)


async def login(request: Request) -> Response:
    form = await read_form(request)
    runtime = runtime_of(request)
    key = form.get("key", "").strip()
    target = _safe_next(form.get("next"))
    # The address uvicorn reports: the peer, or the client a trusted proxy names (--proxy-headers).
    address = client_address(request)
    # No await from here to the verdict: concurrent attempts cannot slip between the check and the count.
    refusal = signin_refusal(request, address)
    if refusal is not None:  # the key is not checked, so neither the answer nor its timing tells anything
        locked = render("login.html", 429, next=target, error=_locked_out(refusal), key_invalid=False)
        locked.headers["Retry-After"] = str(refusal.seconds)
        return locked
    if not key or not runtime.authenticator.is_service_key(key):
        record_signin(request, address, valid=False)
        log.info("dashboard login refused: not a known API key")
        refused = render("login.html", 401, next=target, error="That is not a valid service API key.", key_invalid=True)
        refused.headers["WWW-Authenticate"] = 'Bearer realm="notifier"'
        return refused
    record_signin(request, address, valid=True)
    response = RedirectResponse(target, status_code=303)
    secure = request.url.scheme == "https" or runtime.settings.public_url.startswith("https://")
    response.set_cookie(COOKIE, issue_session(key, now=time.time()), max_age=SESSION_SECONDS, path=COOKIE_PATH,
                        secure=secure, httponly=True, samesite="strict")  # fmt: skip
    log.info("dashboard session started")
    return response


async def logout(request: Request) -> Response:
    seen = viewer_of(request)
    check_csrf(seen, await read_form(request))
    if seen.session is not None:  # revoked until it would have expired: a copy of the cookie is refused too
        expires_at = dt.datetime.fromtimestamp(seen.session.expires, dt.UTC)
        async with runtime_of(request).sessions() as session, session.begin():
            await revocations.revoke(
                session,
                kind=CredentialKind.dashboard_session,
                credential_id=seen.session.nonce,
                expires_at=expires_at,
                now=utcnow(),
            )
        log.info("dashboard session ended")
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


async def overview(request: Request) -> Response:
    seen = viewer_of(request)
    runtime = runtime_of(request)
    async with runtime.sessions() as session:
        channels = await channel_stats(session, now=utcnow())
        events = await recent_events(session, limit=20)
    chart = bar_chart(channels)
    return render("overview.html", csrf=seen.csrf, channels=channels, chart=chart, events=events)


async def deliveries_page(request: Request) -> Response:
    seen = viewer_of(request)
    runtime = runtime_of(request)
    given = {k: v.strip() for k, v in request.query_params.items() if k in ("status", "channel", "type", "user_id",
                                                                         "event_id") and v.strip()}  # fmt: skip
    errors: list[FieldError] = []
    filters = parse_filters(given, errors)
    try:
        cursor = decode_cursor(request)
    except ValidationFailed as exc:
        errors.extend(exc.errors)
        cursor = None
    rows: list[dict[str, Any]] = []
    next_url = None
    if not errors:
        rows, next_cursor = await page_of_deliveries(runtime, filters, cursor=cursor, limit=DEFAULT_LIMIT)
        if next_cursor:
            next_url = "/dashboard/deliveries?" + urllib.parse.urlencode({**given, "cursor": next_cursor})
    return render("deliveries.html", 422 if errors else 200, csrf=seen.csrf, given=given, rows=rows,
                  next_url=next_url, errors=[e.msg for e in errors], types=sorted(runtime.catalog.types))  # fmt: skip


async def _delivery_page(
    request: Request, seen: Viewer, *, notice: str | None = None, error: Conflict | None = None
) -> Response:
    try:
        detail = await delivery_detail(runtime_of(request), path_uuid(request, "delivery_id"))
    except NotFound as exc:
        return render("error.html", status_for(exc), csrf=seen.csrf, title="Delivery not found", message=exc.detail)
    status = status_for(error) if error is not None else 200
    return render(
        "delivery.html", status, csrf=seen.csrf, d=detail, notice=notice, error=error.detail if error else None
    )


async def delivery_page(request: Request) -> Response:
    seen = viewer_of(request)
    notice = "Retry queued; this page follows it until it settles." if request.query_params.get("retried") else None
    return await _delivery_page(request, seen, notice=notice)


async def retry(request: Request) -> Response:
    seen = viewer_of(request)
    delivery_id = path_uuid(request, "delivery_id")
    if seen.csrf is not None:
        check_csrf(seen, await read_form(request))
    try:
        await retry_delivery(runtime_of(request), delivery_id)
    except Conflict as exc:
        return await _delivery_page(request, seen, error=exc)
    return RedirectResponse(f"/dashboard/deliveries/{delivery_id}?retried=1", status_code=303)


HTML_PAGE = ("text/html",)
ROUTES = [
    ApiRoute("GET", "/dashboard", overview, "Dashboard: last 24 h by channel and recent events", "dashboard",
             responses={200: "The page", 303: "To the login page (a browser without a session)"},
             response_types=HTML_PAGE, tag="dashboard"),
    ApiRoute("GET", "/dashboard/login", login_page, "Dashboard sign-in form", "none", response_types=HTML_PAGE,
             tag="dashboard"),
    ApiRoute("POST", "/dashboard/login", login, "Trade the service key for a dashboard session cookie", "none",
             content_type=FORM,
             responses={303: "Signed in", 401: "Not a service key", 403: "Another site's form (Origin)",
                        429: "Too many failed sign-ins from this address, or from all addresses; the key was not "
                             "checked (Retry-After)"},
             response_types=HTML_PAGE, tag="dashboard"),
    ApiRoute("POST", "/dashboard/logout", logout, "End the dashboard session", "dashboard", content_type=FORM,
             responses={303: "Signed out", 403: "Another site's form, or not this session's CSRF token"},
             response_types=HTML_PAGE, tag="dashboard"),
    ApiRoute("GET", "/dashboard/deliveries", deliveries_page, "Dashboard: deliveries, filterable", "dashboard",
             query=("status", "channel", "type", "user_id", "event_id", "cursor"),
             responses={200: "The page", 303: "To the login page"}, response_types=HTML_PAGE, tag="dashboard"),
    ApiRoute("GET", "/dashboard/deliveries/{delivery_id}", delivery_page, "Dashboard: one delivery", "dashboard",
             responses={200: "The page", 303: "To the login page"}, response_types=HTML_PAGE, tag="dashboard"),
    ApiRoute("POST", "/dashboard/deliveries/{delivery_id}/retry", retry, "Dashboard: retry a failed delivery",
             "dashboard", content_type=FORM,
             responses={303: "Re-queued: to the delivery page", 403: "Another site's form, or not this session's "
                        "CSRF token", 409: "Not failed"},
             response_types=HTML_PAGE, tag="dashboard"),
]  # fmt: skip
