"""Pure ASGI middleware: a request id on every request and one log line per request."""

from __future__ import annotations

import abc
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from notifier.logs import request_id_var

log = logging.getLogger("notifier.http")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")  # fullmatch: "$" would take a trailing newline


class HttpMiddleware(abc.ABC):
    """Pure ASGI middleware that acts on HTTP requests only: lifespan (and any other scope) passes by."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @abc.abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request, calling ``self.app`` on the way."""


class RequestLogMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            # The path template, never the query string: tokens may travel there (preference center links).
            log.info(
                "%s %s %d",
                scope["method"],
                template,
                status,
                extra={
                    "method": scope["method"],
                    "route": template,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
            metrics = getattr(scope.get("app"), "state", None)
            runtime = getattr(metrics, "runtime", None) if metrics is not None else None
            if runtime is not None:
                runtime.metrics.http_requests.labels(route=template, method=scope["method"], status=str(status)).inc()
            request_id_var.reset(token)
