"""CORS for the routes the inbox component calls from another origin (``/v1/users/{id}/inbox*``).

The component runs on the product's pages and calls notifier at its own base URL with
``Authorization: Bearer <user JWT>``. Only origins listed in ``NOTIFIER_CORS_ORIGINS`` may; by default
none (same origin only). No cookies are involved, so credentials are never allowed; every other route
stays same-origin whatever the setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CORS_PATHS = re.compile(r"/v1/users/[^/]+/inbox(/[^/]+)*/?")  # fullmatch
ALLOWED_METHODS = "GET, POST"
ALLOWED_HEADERS = "Authorization, Content-Type"
PREFLIGHT_MAX_AGE = "600"  # seconds a browser may reuse a preflight answer


class InboxCorsMiddleware:
    """Pure ASGI middleware: answers preflights and labels responses for the allowed origins, on inbox paths."""

    def __init__(self, app: ASGIApp, origins: Iterable[str] = ()) -> None:
        self.app = app
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.origins or not CORS_PATHS.fullmatch(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        allowed = origin is not None and origin in self.origins
        if allowed and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            preflight = Response(
                status_code=204,
                headers={
                    "Access-Control-Allow-Origin": str(origin),
                    "Access-Control-Allow-Methods": ALLOWED_METHODS,
                    "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                    "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
                    "Vary": "Origin",
                },
            )
            await preflight(scope, receive, send)
            return

        async def send_labelled(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                # The answer differs by Origin, so a shared cache must key on it, allowed or not.
                response_headers.add_vary_header("Origin")
                if allowed:
                    response_headers["Access-Control-Allow-Origin"] = str(origin)
            await send(message)

        await self.app(scope, receive, send_labelled)
