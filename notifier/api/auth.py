"""Who may call a route, enforced in one place: every ``ApiRoute`` declares its ``auth`` and ``guard`` checks
it before the handler runs (the same declaration feeds /openapi.json).

=====================  ==========================================================================
auth                   the caller must bring
=====================  ==========================================================================
``service``            a service API key
``user``               the JWT of the user named by the path's ``user_id`` (not even a service key)
``user_or_service``    a service API key, or the JWT of the user named by the path's ``user_id``
``qstash``             an ``Upstash-Signature`` valid for the raw body and this URL, and not used before
                       (spent here, or by the handler of a ``spends_signature`` route: see below)
``service_or_qstash``  either of those two (a signature, when present, is what is checked)
``service_or_ticket``  a service API key, or a demo ticket (form field ``ticket``; the principal is then
                       the user it names)
``dashboard``          a dashboard session cookie (not signed out) or a service API key; a browser
                       without either is sent to the sign-in page
``none``               nothing
=====================  ==========================================================================

No credential or a bad one raises ``Unauthenticated`` (401); a valid credential outside the route's scope
raises ``Forbidden`` (403); past the cap on failed bearer credentials (``failure_caps``), a bearer credential
from an address not vouched for raises ``RateLimited`` (429) unchecked. The checked principal is on
``request.state.principal``; a QStash route's verified raw body is what ``common.read_body`` returns afterwards.

A QStash signature is good for one request. Its ``jti`` is recorded in ``revoked_credentials`` (shared by every
replica) until its ``exp`` has passed, and a second request with it is a 401: a captured request cannot be
replayed, neither to ``POST /v1/events`` with another ``Upstash-Message-Id`` (the idempotency key the signature
does not cover) nor to the delivery, failure and cron routes. QStash itself never repeats a signature: every
attempt, retries included, is signed anew with a new ``jti``, so its retries pass. This is done on every
signed route, not only event ingest: it closes replays everywhere at once. The cost is an insert by primary key,
plus the purge of at most a few dead rows, per signed request.

Where the jti is spent depends on the route. Most signed routes spend it in a short transaction of their own
before the handler runs: small beside the work each of those requests does, and if the handler then fails,
QStash's retry comes with a new signature. The attempt routes (a delivery's, a send group's) are QStash's hot path,
and the cost of a QStash delivery is mostly its transactions, so they declare ``spends_signature``: ``guard``
verifies the signature (a bad one is still a 401 before the handler runs) and leaves it unspent on
``request.state``; the handler hands ``signature_spender(request)`` to the runner, which spends it in the claim:
in the claim's one statement on PostgreSQL (``notifier.db.claiming``), else first thing in the claim's
transaction -- two writes per attempt callback instead of three. A replay is refused there with the same 401
and nothing of the claim is written; a claim that fails takes the spend back with it, and that signature may be
tried once more (it can only do what QStash's own retry would). If such a handler answers without spending it
(an id that cannot exist), ``guard`` spends it before the answer leaves.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from notifier.api.common import ApiRoute, Auth, Endpoint, read_body, read_form, runtime_of
from notifier.api.failure_caps import client_address, credential_shape, failure_caps
from notifier.api.sessions import COOKIE, Session, Viewer, read_session, read_ticket
from notifier.db import revocations
from notifier.db.revocations import CredentialKind
from notifier.delivery.runner import Spend
from notifier.errors import Forbidden, MalformedBody, RateLimited, Unauthenticated, UnsupportedMediaType
from notifier.security import Principal, QStashSignature, bearer_token

log = logging.getLogger("notifier.security")

FORM = "application/x-www-form-urlencoded"
"""A form body: what a page on any site can make a browser post here, so ``guard`` checks its origin."""
Check = Callable[[Request], Awaitable[Principal | Response]]
"""Returns the caller (or, for a browser, where to go instead); raises ``Unauthenticated``/``Forbidden``."""


def _bearer(request: Request, *, allow_user: bool) -> Principal:
    """The principal of the ``Authorization`` header, under the cap on failed bearer credentials (``failure_caps``:
    past it, an address not vouched for gets 429 and its credential is not checked)."""
    authorization = request.headers.get("authorization")
    authenticator = runtime_of(request).authenticator
    token = bearer_token(authorization)
    if token is None:  # no credential, so nothing guessed: a plain 401, never counted
        return authenticator.authenticate(authorization, allow_user=allow_user)
    caps, address, kind = failure_caps(request), client_address(request), credential_shape(token)
    wait = None if caps.vouched.vouched(kind, address) else caps.bearer.retry_after()
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        raise RateLimited(
            f"too many failed credentials from all clients in the last minute, so this one was not checked; "
            f"retry in {seconds} s",
            retry_after=seconds,
        )
    try:
        principal = authenticator.authenticate(authorization, allow_user=allow_user)
    except Forbidden:  # a valid user token where it may not go: valid all the same
        caps.vouched.vouch(kind, address)
        raise
    except Unauthenticated:
        caps.bearer.record_failure()
        raise
    caps.vouched.vouch(kind, address)
    return principal


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


async def _verified(request: Request) -> QStashSignature:
    if request.headers.get("upstash-signature") is None and request.headers.get("authorization"):
        _bearer(request, allow_user=True)  # 401 unless the credential is valid
        raise Forbidden("only QStash may call this route")
    raw = await read_body(request)
    return runtime_of(request).qstash.verify(
        request.headers.get("upstash-signature"), raw, path=request.url.path, query=request.url.query
    )


def _pending_spend(request: Request, signature: QStashSignature) -> revocations.PendingRevocation:
    """The signature's ``jti``, to be spent by its first use on every signed route: QStash signs each attempt
    anew, so only a replay repeats one (refused with 401)."""
    path = request.url.path

    def replayed() -> Unauthenticated:
        log.warning("refused a replayed Upstash-Signature on %s: it was used before", path)
        return Unauthenticated("this Upstash-Signature was already used; QStash signs every attempt anew")

    return revocations.PendingRevocation(
        CredentialKind.qstash_signature, signature.jti, signature.expires_at, refused=replayed
    )


async def _spend_now(request: Request, spend: revocations.PendingRevocation) -> None:
    async with runtime_of(request).sessions() as session, session.begin():
        await spend(session)


async def _qstash(request: Request) -> Principal:
    await _spend_now(request, _pending_spend(request, await _verified(request)))
    return Principal("qstash")


async def _qstash_unspent(request: Request) -> Principal:
    request.state.unspent_signature = _pending_spend(request, await _verified(request))
    return Principal("qstash")


def signature_spender(request: Request) -> Spend:
    """How the handler of a ``spends_signature`` route spends the request's signature: as the first step of its
    first transaction (the runner's ``spend``)."""
    spend: revocations.PendingRevocation = request.state.unspent_signature
    return spend


async def _spend_if_unspent(request: Request) -> None:
    # A handler's path to an answer that opened no transaction (an id that cannot exist) must not leave the
    # signature good for another request; this costs a transaction only on such a path.
    spend: revocations.PendingRevocation = request.state.unspent_signature
    if not spend.done:
        await _spend_now(request, spend)


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


async def _signed_out(request: Request, session: Session) -> bool:
    """Whether ``session`` was ended by signing out (on any replica): its nonce is revoked in the database."""
    async with runtime_of(request).sessions() as db_session:
        return await revocations.is_revoked(
            db_session, kind=CredentialKind.dashboard_session, credential_id=session.nonce
        )


async def _dashboard(request: Request) -> Principal | Response:
    if "authorization" in request.headers:
        principal = await _service(request)
        request.state.viewer = Viewer(session=None)
        return principal
    session = read_session(runtime_of(request).authenticator, request.cookies.get(COOKIE), now=time.time())
    if session is not None and not await _signed_out(request, session):
        request.state.viewer = Viewer(session=session)
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


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url`` as a browser serializes an origin (default port left out); "" if none."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    default = {"http": 80, "https": 443}[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def require_same_origin(request: Request) -> None:
    """Refuse with ``Forbidden`` a form another site's page made a browser post here (CSRF, and key guessing from
    visitors' browsers, whose addresses the per-address limit would count apart).

    This service's origins are ``NOTIFIER_PUBLIC_URL``'s and the request's own (scheme and Host). A browser sends
    ``Origin`` with every POST (``null`` from an opaque or privacy-sensitive context: refused). Without it the
    ``Referer``'s origin is checked instead; a request with neither is not a browser's cross-site form (scripts,
    curl) and passes.
    """
    origin, referer = request.headers.get("origin"), request.headers.get("referer")
    if origin is not None:
        source, claimed = "Origin", origin[:100]
        seen = origin if _origin(origin) == origin else ""  # the header is exactly an origin, or it is not one
    elif referer is not None:  # its path and query are not echoed back: only the origin matters
        source, seen = "Referer", _origin(referer)
        claimed = seen or "(not a URL)"
    else:
        return
    own = {_origin(runtime_of(request).settings.public_url), _origin(str(request.base_url))}
    if not seen or seen not in own:
        raise Forbidden(
            f"cross-site form refused: its {source} {claimed!r} is not this service's origin "
            f"({', '.join(sorted(own))}); if this is the address you use, set NOTIFIER_PUBLIC_URL to it"
        )


def guard(route: ApiRoute) -> Endpoint:
    """``route.endpoint``, run only once the caller passes ``route.auth`` (and, for a form a browser may post,
    ``require_same_origin``). A ``spends_signature`` route's signature is verified here but spent by its handler
    (or, if the handler did not, here before the answer leaves)."""
    check, handler = _qstash_unspent if route.spends_signature else CHECKS[route.auth], route.endpoint
    form = route.method == "POST" and route.content_type == FORM
    spends = route.spends_signature

    async def guarded(request: Request) -> Response:
        if form:
            require_same_origin(request)
        principal = await check(request)
        if isinstance(principal, Response):
            return principal
        request.state.principal = principal
        response = await handler(request)
        if spends:
            await _spend_if_unspent(request)
        return response

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
