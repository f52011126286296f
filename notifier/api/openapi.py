"""The OpenAPI 3.1 document, generated from the same route specs Starlette serves."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from notifier.api.common import ApiRoute

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
}
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "service": [{"serviceKey": []}],
    "user": [{"userToken": []}],
    "user_or_service": [{"serviceKey": []}, {"userToken": []}],
    "qstash": [{"qstashSignature": []}],
    "service_or_qstash": [{"serviceKey": []}, {"qstashSignature": []}],
    "service_or_ticket": [{"serviceKey": []}, {}],  # or the demo page's form field "ticket" (no scheme fits)
    "dashboard": [{"serviceKey": []}, {"dashboardSession": []}],
    "none": [],
}
# 429: past the cap on failed bearer credentials, from an address not vouched for (api.failure_caps).
# 503 (with Retry-After): the database cannot serve now. Every route behind a credential reads or writes it,
# except the realtime token (``user``), which is signed without it.
ERRORS_BY_AUTH = {
    "service": (400, 401, 403, 404, 409, 412, 413, 415, 422, 429, 503),
    "user": (401, 403, 429),  # 403: a service key, or another user's token
    "user_or_service": (400, 401, 403, 404, 409, 412, 413, 415, 422, 429, 503),
    "qstash": (401, 403, 404, 429, 503),  # 403: a service key or user token where only QStash may call
    "service_or_qstash": (400, 401, 403, 409, 413, 415, 422, 429, 503),
    "service_or_ticket": (400, 401, 403, 413, 415, 422, 429, 503),
    "dashboard": (400, 401, 403, 404, 409, 412, 413, 415, 422, 429, 503),
    "none": (),
}


def _response(route: ApiRoute, code: int, description: str) -> dict[str, Any]:
    """A documented answer: no body for 204 and redirects; errors as problem+json (or the route's own pages)."""
    response: dict[str, Any] = {"description": description}
    if code == 204 or 300 <= code < 400:
        return response
    content: dict[str, Any] = {}
    if code >= 400:
        content["application/problem+json"] = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for media_type in route.response_types:
        if code < 400 or media_type != "application/json":
            content[media_type] = {"schema": {"type": "object" if media_type.endswith("json") else "string"}}
    response["content"] = content
    return response


def build_openapi(routes: Iterable[ApiRoute], *, version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', route.path.lower()).strip('_')}",
            "tags": [route.tag] if route.tag else [],
            "security": SECURITY[route.auth],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"{(\w+)}", route.path)
            ]
            + [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}} for name in route.query],
            "responses": {
                str(code): _response(route, code, text) for code, text in (route.responses or {200: "OK"}).items()
            },
        }
        errors = ERRORS_BY_AUTH[route.auth] + ((404,) if "{" in route.path else ())
        for code in errors:
            operation["responses"].setdefault(str(code), _response(route, code, "Problem"))
        if route.body is not None:
            schema = route.body.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[route.body.__name__] = schema
            operation["requestBody"] = {
                "required": True,
                "content": {route.content_type: {"schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "notifier",
            "version": version,
            "description": "Notification routing: domain events in; push, email and in-app out.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "serviceKey": {"type": "http", "scheme": "bearer", "description": "A key from NOTIFIER_API_KEYS"},
                "userToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "HS256 with NOTIFIER_USER_JWT_SECRET; sub = user id; exp required",
                },
                "qstashSignature": {"type": "apiKey", "in": "header", "name": "Upstash-Signature"},
                "dashboardSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "notifier_dashboard",
                    "description": "The session cookie POST /dashboard/login sets for a service key",
                },
            },
        },
    }
