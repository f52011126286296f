"""Operations: liveness, readiness, metrics, the OpenAPI document and its viewer."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from notifier import db
from notifier.api.common import ApiRoute, runtime_of
from notifier.api.problems import problem
from notifier.db import deliveries

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>notifier API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div><script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>"""
DOCS_INIT = "window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#ui'});"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)
    if (trouble := await db.readiness(runtime.engine)) is not None:
        return problem(503, "Service not ready", trouble)
    return JSONResponse(
        {"status": "ready", "dispatcher": runtime.dispatcher.name, "channels": runtime.channels.describe()}
    )


async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    async with runtime.sessions() as session:
        backlog = await deliveries.backlog(session)
    for status, count in backlog.items():
        runtime.metrics.backlog.labels(status=status).set(count)
    return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def docs(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE)


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
