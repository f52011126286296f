"""Who may call a route, enforced in one place: every ``ApiRoute`` declares its ``auth`` and ``guard`` checks
it before the handler runs (the same declaration feeds /openapi.json).

=====================  ==========================================================================
auth                   the caller must bring
=====================  ==========================================================================
``service``            a service API key
``user``               the JWT of the user named by the path's ``user_id`` (not even a service key)
``user_or_service``    a service API key, or the JWT of the user named by the path's ``user_id``
``qstash``             an ``Upstash-Signature`` valid for the raw body and this URL
``service_or_qstash``  either of those two (a signature, when present, is what is checked)
``service_or_ticket``  a service API key, or a demo ticket (form field ``ticket``; the principal is then
                       the user it names)
``dashboard``          a dashboard session cookie or a service API key; a browser without either is
                       sent to the sign-in page
``none``               nothing
=====================  ==========================================================================

No credential or a bad one raises ``Unauthenticated`` (401); a valid credential outside the route's scope
raises ``Forbidden`` (403). The checked principal is on ``request.state.principal``; a QStash route's
verified raw body is what ``common.read_body`` returns afterwards.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from notifier.api.common import ApiRoute, Auth, Endpoint, read_body, read_form, runtime_of
from notifier.api.sessions import COOKIE, Viewer, read_session, read_ticket
from notifier.errors import Forbidden, MalformedBody, Unauthenticated, UnsupportedMediaType
from notifier.security import Principal

Check = Callable[[Request], Awaitable[Principal | Response]]
"""Returns the caller (or, for a browser, where to go instead); raises ``Unauthenticated``/``Forbidden``."""


def _bearer(request: Request, *, allow_user: bool) -> Principal:
    authorization = request.headers.get("authorization")
    return runtime_of(request).authenticator.authenticate(authorization, allow_user=allow_user)


async def _service(request: Request) -> Principal:
    principal = _bearer(request, allow_user=False)
    principal.require_service()
    return principal


async def _user(request: Request) -> Principal:
    principal = _bearer(request, allow_user=True)
    if principal.kind != "user" or principal.user_id != request.path_params["user_id"]:
        raise Forbidden("only the user's own token may call this route")
    return principal


async def _user_or_service(request: Request) -> Principal:
    principal = _bearer(request, allow_user=True)
    principal.require_user_or_service(request.path_params["user_id"])
    return principal


async def _qstash(request: Request) -> Principal:
    if request.headers.get("upstash-signature") is None and request.headers.get("authorization"):
        _bearer(request, allow_user=True)  # 401 unless the credential is valid
        raise Forbidden("only QStash may call this route")
    raw = await read_body(request)
    runtime_of(request).qstash.verify(
        request.headers.get("upstash-signature"), raw, path=request.url.path, query=request.url.query
    )
    return Principal("qstash")


async def _service_or_qstash(request: Request) -> Principal:
    if request.headers.get("upstash-signature") is not None:
        return await _qstash(request)
    return await _service(request)


async def _service_or_ticket(request: Request) -> Principal:
    if "authorization" in request.headers:
        return await _service(request)
    try:
        ticket = (await read_form(request)).get("ticket", "")
    except (UnsupportedMediaType, MalformedBody):
        ticket = ""  # not a form: no ticket, and so no credential
    user_id = read_ticket(runtime_of(request).authenticator, ticket, now=time.time())
    if user_id is None:
        raise Unauthenticated("missing or expired demo ticket; sign in to /inbox-demo again")
    return Principal("user", user_id=user_id)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def login_url(request: Request) -> str:
    """The sign-in page, with a ``next`` that returns to the page the request came from."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":  # after signing in, go back to the page the form was on, not to the action
        target = target.removesuffix("/retry") if target.endswith("/retry") else "/dashboard"
    return "/dashboard/login" + (f"?{urllib.parse.urlencode({'next': target})}" if target != "/dashboard" else "")


async def _dashboard(request: Request) -> Principal | Response:
    if "authorization" in request.headers:
        principal = await _service(request)
        request.state.viewer = Viewer(csrf=None)
        return principal
    session = read_session(runtime_of(request).authenticator, request.cookies.get(COOKIE), now=time.time())
    if session is not None:
        request.state.viewer = Viewer(csrf=session.csrf)
        return Principal("service")
    if _wants_html(request):
        return RedirectResponse(login_url(request), status_code=303)
    raise Unauthenticated("missing bearer credential or dashboard session")


async def _anyone(request: Request) -> Principal:
    return Principal("anonymous")


CHECKS: dict[Auth, Check] = {
    "service": _service,
    "user": _user,
    "user_or_service": _user_or_service,
    "qstash": _qstash,
    "service_or_qstash": _service_or_qstash,
    "service_or_ticket": _service_or_ticket,
    "dashboard": _dashboard,
    "none": _anyone,
}


def guard(route: ApiRoute) -> Endpoint:
    """``route.endpoint``, run only once the caller passes ``route.auth``."""
    check, handler = CHECKS[route.auth], route.endpoint

    async def guarded(request: Request) -> Response:
        principal = await check(request)
        if isinstance(principal, Response):
            return principal
        request.state.principal = principal
        return await handler(request)

    guarded.__name__ = handler.__name__
    return guarded


def principal_of(request: Request) -> Principal:
    """The caller ``guard`` checked."""
    principal: Principal = request.state.principal
    return principal


def viewer_of(request: Request) -> Viewer:
    """The dashboard viewer ``guard`` checked (its CSRF token; None for a bearer key)."""
    viewer: Viewer = request.state.viewer
    return viewer
