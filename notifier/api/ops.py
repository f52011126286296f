"""Operations: liveness, readiness, metrics, the OpenAPI document and its viewer."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from notifier import db
from notifier.api.common import ApiRoute, runtime_of
from notifier.api.problems import problem
from notifier.models import Delivery
from notifier.types import PENDING_STATUSES

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>notifier API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div><script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>"""
DOCS_INIT = "window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#ui'});"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _is_migrated(engine: AsyncEngine) -> bool:
    try:
        return await db.is_migrated(engine)
    except sa.exc.DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        # A pooled connection the server had closed (a restart, a failover, an idle timeout): connections
        # are not pinged before use, so the pool learns it here and drops them. Ask once more on a fresh
        # one before calling a healthy database unreachable.
        return await db.is_migrated(engine)


async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        migrated = await _is_migrated(runtime.engine)
    except Exception:
        return problem(503, "Service not ready", "the database is unreachable")
    if not migrated:
        return problem(503, "Service not ready", "the database schema is not migrated; run `notifier migrate`")
    return JSONResponse(
        {"status": "ready", "dispatcher": runtime.dispatcher.name, "channels": runtime.channels.describe()}
    )


async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    async with runtime.sessions() as session:
        rows = await session.execute(
            sa.select(col(Delivery.status), sa.func.count())
            .where(col(Delivery.status).in_(list(PENDING_STATUSES)))
            .group_by(Delivery.status)
        )
        counts: dict[str, int] = dict(rows.all())
    for status in PENDING_STATUSES:
        runtime.metrics.backlog.labels(status=str(status)).set(counts.get(str(status), 0))
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
