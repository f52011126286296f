"""Operations: liveness, readiness, metrics, the OpenAPI document and its viewer.

None of them needs the database to answer: /readyz says whether it is there (503 with Retry-After when not),
and /metrics reports ``notifier_database_up`` 0 and leaves the backlog out rather than wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from notifier import db
from notifier.api.common import ApiRoute, runtime_of
from notifier.api.pages import PAGE_HEADERS
from notifier.api.problems import problem
from notifier.db import delivery_reads
from notifier.errors import NotReady

log = logging.getLogger("notifier.api")
METRICS_DATABASE_SECONDS = 2.0
"""How long a scrape waits for the backlog query (a scraper's own timeout is usually 10 s)."""

SWAGGER_UI_DIR = Path(__file__).resolve().parent.parent / "web" / "swagger_ui"
"""Swagger UI 5 (it reads OpenAPI 3.1), vendored from npm's swagger-ui-dist; served at /docs/static."""
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>notifier API</title>
<link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div><script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>"""
# validatorUrl: null — never send the document to swagger.io's online validator (the page works offline).
DOCS_INIT = "window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#ui', validatorUrl: null});"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)
    if (trouble := await db.readiness(runtime.engine)) is not None:
        runtime.metrics.database_answered(False)
        wait = NotReady().retry_after
        return problem(503, "Service not ready", trouble, headers={"Retry-After": str(wait)})
    runtime.metrics.database_answered(True)
    return JSONResponse(
        {"status": "ready", "dispatcher": runtime.dispatcher.name, "channels": runtime.channels.describe()}
    )


async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        async with asyncio.timeout(METRICS_DATABASE_SECONDS), runtime.sessions() as session:
            backlog: dict[str, int] | None = await delivery_reads.backlog(session)
    except TimeoutError:
        backlog = None
        log.warning("/metrics: the backlog query took over %.0f s; left out", METRICS_DATABASE_SECONDS)
    except Exception as exc:
        if (reason := db.unavailable(exc)) is None:
            raise  # our bug: a 500, as anywhere else
        backlog = None
        log.warning("/metrics: %s; the backlog is left out", reason)
    runtime.metrics.database_answered(backlog is not None)
    runtime.metrics.backlog.clear()  # a count the database did not give now is no count
    for status, count in (backlog or {}).items():
        runtime.metrics.backlog.labels(status=status).set(count)
    return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def docs(request: Request) -> Response:
    # The pages' strict CSP: Swagger UI needs no inline script or style, and "Try it out" calls this origin only.
    return HTMLResponse(DOCS_PAGE, headers=PAGE_HEADERS)


async def docs_init(request: Request) -> Response:
    return Response(DOCS_INIT, media_type="text/javascript")


ROUTES = [
    ApiRoute("GET", "/healthz", healthz, "Liveness", "none", tag="ops"),
    ApiRoute(
        "GET",
        "/readyz",
        readyz,
        "Readiness: database reachable and migrated",
        "none",
        responses={200: "Ready", 503: "Not ready"},
        tag="ops",
    ),
    ApiRoute("GET", "/metrics", metrics, "Prometheus metrics", "none", tag="ops", response_types=("text/plain",)),
    ApiRoute("GET", "/openapi.json", openapi, "This document", "none", tag="ops"),
    ApiRoute("GET", "/docs", docs, "API viewer", "none", tag="ops", response_types=("text/html",)),
    ApiRoute(
        "GET", "/docs/init.js", docs_init, "API viewer script", "none", tag="ops", response_types=("text/javascript",)
    ),
]
