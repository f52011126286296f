"""The one place where errors become HTTP: RFC 9457 problem+json for every failure."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from notifier.api.middleware import HttpMiddleware
from notifier.errors import (
    Conflict,
    Forbidden,
    MalformedBody,
    NotFound,
    NotifierError,
    NotReady,
    PayloadTooLarge,
    PreconditionFailed,
    RateLimited,
    RequestError,
    Unauthenticated,
    UnsupportedMediaType,
    ValidationFailed,
)

log = logging.getLogger("notifier.api")

# Most specific first: the first class an error is an instance of decides its status.
STATUS_BY_ERROR: tuple[tuple[type[NotifierError], int], ...] = (
    (MalformedBody, 400),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (PreconditionFailed, 412),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (ValidationFailed, 422),
    (RateLimited, 429),
    (RequestError, 400),
    (NotReady, 503),
    (NotifierError, 500),
)


def status_for(exc: NotifierError) -> int:
    return next(status for cls, status in STATUS_BY_ERROR if isinstance(exc, cls))


def problem(
    status: int,
    title: str,
    detail: str = "",
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    response = JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")
    return response


async def notifier_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotifierError)
    status = status_for(exc)
    errors = [e.as_dict() for e in exc.errors] if isinstance(exc, ValidationFailed) else None
    headers = {"WWW-Authenticate": 'Bearer realm="notifier"'} if status == 401 else None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, NotReady):  # our own words (never the driver's), and when to come back
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "-"
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template, as the request log names it
        log.warning("%s %s: not ready: %s (%s)", request.method, route, exc.detail, cause)
        detail = f"{exc.detail or 'the service cannot serve now'}; retry after {exc.retry_after} seconds"
        return problem(status, exc.title, detail, headers={"Retry-After": str(exc.retry_after)})
    if status >= 500:
        log.error("request failed: %s", type(exc).__name__)
        return problem(status, exc.title, "the service could not complete the request", headers=headers)
    return problem(status, exc.title, exc.detail, errors=errors, headers=headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    titles = {404: "Not found", 405: "Method not allowed"}
    return problem(
        exc.status_code,
        titles.get(exc.status_code, "HTTP error"),
        str(exc.detail or ""),
        headers=dict(exc.headers or {}),
    )


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    # Never a stack trace, SQL or secret in the response; the log gets the exception class and location.
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return problem(500, "Internal error", "the service could not complete the request")


class UnexpectedErrorMiddleware(HttpMiddleware):
    """Answers an exception no handler took with the generic 500 problem, and ends it there.

    Not an ``exception_handlers[Exception]`` entry: Starlette runs that one in its outermost middleware, which
    re-raises after answering, and uvicorn then logs the traceback a second time (SQL and its parameters in
    it) and closes the connection right after the 500 -- under a keep-alive client (QStash, a load balancer,
    httpx) that may already be sending its next request on it, which then fails with a reset.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as exc:
            if started:  # half an answer is out: only the server closing the connection can tell the client
                raise
            response = await unexpected_error_handler(Request(scope), exc)
            await response(scope, receive, send)


EXCEPTION_HANDLERS = {
    NotifierError: notifier_error_handler,
    HTTPException: http_exception_handler,
}
