"""The embeddable inbox component (``<notifier-inbox>``): its script, and a demo page to try it.

``/static/inbox.js`` is always the current script and is revalidated on every use (``no-cache`` with an
ETag, so a deploy reaches every page at once); ``/static/inbox.<hash>.js`` names one version by its
content and may be cached for a year. A stale hash is redirected to the current script rather than
answered 404, so a page rendered before a deploy keeps working.

``/inbox-demo`` shows the component for a chosen user to whoever holds a service API key: the form trades
the key (checked like a dashboard sign-in, with the same limits) and a user id for a page that
embeds the component with a user JWT minted here for ``DEMO_SECONDS``, and a demo ticket (``api.sessions``)
that lets the page send that user a test notification (``POST /inbox-demo/send``) without the key. Minting a
user JWT needs ``NOTIFIER_USER_JWT_SECRET``; without it the page says how to set one.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import jwt
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from notifier.api.auth import principal_of
from notifier.api.common import ApiRoute, read_form, runtime_of
from notifier.api.events import accept
from notifier.api.failure_caps import client_address
from notifier.api.pages import MEDIA_TYPES, static_files, static_url, templates
from notifier.api.sessions import DEMO_SECONDS, issue_ticket
from notifier.api.signin_limit import record_signin, signin_refusal
from notifier.errors import FieldError, ValidationFailed
from notifier.runtime import Runtime
from notifier.types import id_problem

COMPONENT = "inbox.js"
SCRIPT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # A public script: a page may load it as a module (CORS mode) or under Cross-Origin-Embedder-Policy.
    "Access-Control-Allow-Origin": "*",
    "Cross-Origin-Resource-Policy": "cross-origin",
}


def component_path() -> str:
    """The content-addressed path of the current component script (cacheable for a year)."""
    return f"/static/inbox.{static_files()[COMPONENT][1]}.js"


async def component_script(request: Request) -> Response:
    path, digest = static_files()[COMPONENT]
    headers = {
        **SCRIPT_HEADERS,
        "Cache-Control": "no-cache",
        "ETag": f'"{digest}"',
        "Link": f'<{component_path()}>; rel="canonical"',
    }
    if f'"{digest}"' in request.headers.get("if-none-match", "").replace("W/", "").split(", "):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)


async def versioned_component_script(request: Request) -> Response:
    path, digest = static_files()[COMPONENT]
    if request.path_params["version"] != digest:
        return RedirectResponse("/static/inbox.js", status_code=302, headers={"Cache-Control": "no-store"})
    headers = {**SCRIPT_HEADERS, "Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{digest}"'}
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)


# ---- the demo page ---------------------------------------------------------------------------------------


def page_headers(runtime: Runtime) -> dict[str, str]:
    """The demo page's headers: strict CSP, plus Ably's host for the component's token exchange and stream."""
    realtime = runtime.realtime
    connect = "'self'" + (f" {realtime.base_url}" if realtime is not None else "")
    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "same-origin",  # no-referrer would make the sign-in form post "Origin: null" (refused)
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
    }


def _render(runtime: Runtime, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("error", None)
    context.setdefault("user_id", "")
    context.setdefault("key_invalid", False)
    html = (
        templates()
        .get_template("inbox-demo.html")
        .render(
            static_url=static_url,
            component_path=component_path(),
            jwt_configured=runtime.settings.user_jwt_secret is not None,
            realtime=runtime.realtime is not None,
            **context,
        )
    )
    return HTMLResponse(html, status_code=status, headers=page_headers(runtime))


async def demo_signin(request: Request) -> Response:
    return _render(runtime_of(request))


async def demo_page(request: Request) -> Response:
    runtime = runtime_of(request)
    form = await read_form(request)
    key, user_id = form.get("key", "").strip(), form.get("user_id", "").strip()
    address = client_address(request)
    # Shared with the dashboard's sign-in: one budget of guesses per address, and one for all addresses.
    refusal = signin_refusal(request, address)
    if refusal is not None:
        source = "from all addresses in the last minute" if refusal.everyone else "from this address"
        error = f"Too many failed sign-ins {source}, so this one was not checked. Try again in {refusal.seconds} s."
        locked = _render(runtime, 429, error=error, user_id=user_id)
        locked.headers["Retry-After"] = str(refusal.seconds)
        return locked
    if not key or not runtime.authenticator.is_service_key(key):
        record_signin(request, address, valid=False)
        refused = _render(runtime, 401, error="That is not a valid service API key.", user_id=user_id, key_invalid=True)
        refused.headers["WWW-Authenticate"] = 'Bearer realm="notifier"'
        return refused
    record_signin(request, address, valid=True)
    if id_problem(user_id) is not None:  # the API's own rule for ids
        error = "Enter a user id (1 to 200 characters, no control characters or '/', not '.' or '..')."
        return _render(runtime, 422, error=error)
    secret = runtime.settings.user_jwt_secret
    if secret is None:
        return _render(runtime, 200, user_id=user_id)  # the template explains NOTIFIER_USER_JWT_SECRET
    now = time.time()
    token = jwt.encode(
        {"sub": user_id, "iat": int(now), "exp": int(now) + DEMO_SECONDS}, secret.get_secret_value(), algorithm="HS256"
    )
    ticket = issue_ticket(key, user_id, now=now)
    origin = urlsplit(str(request.base_url))
    return _render(
        runtime,
        user_id=user_id,
        token=token,
        ticket=ticket,
        base_url=f"{origin.scheme}://{origin.netloc}",
        minutes=DEMO_SECONDS // 60,
    )


async def demo_send(request: Request) -> Response:
    """Send one test event (booking.confirmed) through the real pipeline: to the user the demo ticket names, or,
    with a service key, to the form's ``user_id``."""
    principal = principal_of(request)
    user_id = principal.user_id if principal.kind == "user" else (await read_form(request)).get("user_id", "").strip()
    if (problem := id_problem(user_id or "")) is not None:
        raise ValidationFailed([FieldError(("body", "user_id"), problem)])
    check_in = (dt.date.today() + dt.timedelta(days=14)).isoformat()
    event = {
        "type": "booking.confirmed",
        "recipients": [user_id],
        "data": {
            "booking_id": f"demo-{secrets.token_hex(3)}",
            "guest_name": "Ann Lee",
            "property": "Seaview 4",
            "check_in": check_in,
        },
    }
    return await accept(runtime_of(request), event, source="inbox-demo")


HTML_PAGE = ("text/html",)
FORM = "application/x-www-form-urlencoded"
SCRIPT_TYPES = (MEDIA_TYPES[".js"].split(";")[0],)
ROUTES = [
    ApiRoute("GET", "/static/inbox.js", component_script, "The inbox web component (always current; revalidate)",
             "none", responses={200: "The script", 304: "Not modified (If-None-Match)"}, tag="pages",
             response_types=SCRIPT_TYPES),
    ApiRoute("GET", "/static/inbox.{version}.js", versioned_component_script,
             "The inbox web component at one content hash (cacheable for a year)", "none",
             responses={200: "The script", 302: "Not the current hash: to /static/inbox.js"}, tag="pages",
             response_types=SCRIPT_TYPES),
    ApiRoute("GET", "/inbox-demo", demo_signin, "Inbox component demo: sign in with a service key and pick a user",
             "none", response_types=HTML_PAGE, tag="pages"),
    ApiRoute("POST", "/inbox-demo", demo_page, "Inbox component demo: the component for the chosen user", "none",
             content_type=FORM, responses={200: "The page", 401: "Not a service key", 403: "Another site's form",
                                           422: "No usable user id",
                                           429: "Too many failed sign-ins from this address, or from all addresses "
                                                "(Retry-After); the key was not checked"},
             response_types=HTML_PAGE, tag="pages"),
    ApiRoute("POST", "/inbox-demo/send", demo_send,
             "Inbox component demo: send the user a test notification (service key, or the page's form field ticket)",
             "service_or_ticket", content_type=FORM, responses={202: "Accepted, as POST /v1/events"}, tag="pages"),
]  # fmt: skip
