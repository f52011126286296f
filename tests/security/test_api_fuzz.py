"""Schemathesis over the documented API: no input, valid or hostile, gets a 5xx or an undocumented answer.

The schema is the document ``/openapi.json`` serves (built by the same code; the last test checks they
are equal), loaded at import so every operation is its own test. Each operation gets 25 generated
requests (positive and negative), derandomized so a failure reproduces, against the real service under
uvicorn with the service key, once on SQLite and once on PostgreSQL (which refuses more: NUL, NaN, a string
longer than its column): no 5xx, only documented status codes, only documented content types. The values
issue #17 found answering 500 are replayed first, as explicit cases through the same checks.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from notifier.app import create_app
from tests.conftest import (
    PG_ADMIN,
    SERVICE_KEY,
    LiveService,
    _asyncpg_url,
    _create_database,
    _drop_database,
    _migrate,
    live_service,
    make_settings,
)

# Hypothesis keeps caches in .hypothesis/ of the working directory; keep them out of the source tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "notifier-hypothesis")
DOCUMENT = create_app(make_settings("sqlite+aiosqlite:///unused.db")).state.openapi
schema = schemathesis.openapi.from_dict(DOCUMENT)
AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """The service under uvicorn on a database of this module's own: an SQLite file, or a fresh PostgreSQL one."""
    if request.param == "sqlite":
        database = tmp_path_factory.mktemp("fuzz") / "notifier.db"
        with live_service(make_settings(f"sqlite+aiosqlite:///{database}")) as live:
            yield live
        return
    if request.getfixturevalue("postgres_database") is None:
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN} (set CI=true to make this an error)")
    name = f"notifier_fuzz_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(name))
    try:
        asyncio.run(_migrate(_asyncpg_url(name)))
        with live_service(make_settings(_asyncpg_url(name))) as live:
            yield live
    finally:
        asyncio.run(_drop_database(name))


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_without_5xx_as_documented(case: schemathesis.Case, live_api: LiveService) -> None:
    case.call_and_validate(base_url=live_api.url, headers=AUTH, checks=CHECKS)


END_OF_TIME = "9999-12-31T23:59:59-23:59"  # parses; past the last instant Python holds in UTC
BOOKING = {"booking_id": "b-1", "guest_name": "Ann", "property": "Sea", "check_in": "2026-12-01"}


def _event(**changes: Any) -> dict[str, Any]:
    return {"type": "booking.confirmed", "recipients": ["u-1"], "data": {**BOOKING}, **changes}


def _raw_event(value: str) -> bytes:
    """A valid booking event whose data also holds ``value`` as raw JSON text (json.dumps cannot write some)."""
    return json.dumps(_event()).replace('"check_in"', '"x": ' + value + ', "check_in"', 1).encode()


# (method, path, what to send): every value issue #17 found answering 500, and the classes around them.
SEEDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cookie expiry ²": ("GET", "/dashboard", {"headers": {"Cookie": "notifier_dashboard=².nonce.mac"}}),
    "cookie expiry of 4301 digits": (
        "GET",
        "/dashboard",
        {"headers": {"Cookie": "notifier_dashboard=" + "1" * 4301 + ".nonce.mac"}},
    ),
    "cookie MAC not ASCII": ("GET", "/dashboard", {"headers": {"Cookie": "notifier_dashboard=9999999999.n.é"}}),
    "limit=²": ("GET", "/v1/events", {"query": {"limit": "²"}}),
    "limit of 5000 digits": ("GET", "/v1/deliveries", {"query": {"limit": "9" * 5000}}),
    "5000-digit integer in data": ("POST", "/v1/events", {"body": _raw_event("9" * 5000)}),
    "NaN in data": ("POST", "/v1/events", {"body": _raw_event("NaN")}),
    "1e400 in data": ("POST", "/v1/events/preview", {"body": _raw_event("1e400")}),
    "lone surrogate in data": ("POST", "/v1/events", {"body": _raw_event('"\\ud800"')}),
    "NUL in data": ("POST", "/v1/events", {"body": _event(data={**BOOKING, "guest_name": "A\u0000"})}),
    "NUL in idempotency_key": ("POST", "/v1/events", {"body": _event(idempotency_key="k\u0000")}),
    "send_at at the end of time": ("POST", "/v1/events", {"body": _event(send_at=END_OF_TIME)}),
    "since at the end of time": ("GET", "/v1/events", {"query": {"since": END_OF_TIME}}),
    "muted_until at the end of time": (
        "PUT",
        "/v1/users/{user_id}/preferences",
        {"path_parameters": {"user_id": "u-1"}, "body": {"muted_until": END_OF_TIME}},
    ),
    "a 300-character requester_id": (
        "POST",
        "/v1/events",
        {
            "body": {
                "type": "approval.responded",
                "data": {"approval_id": "a", "title": "t", "decision": "approved", "requester_id": "r" * 300},
            }
        },
    ),
    "GET /v1/users/%00": ("GET", "/v1/users/{user_id}", {"path_parameters": {"user_id": "\u0000"}}),
    "NUL in an inbox path": ("GET", "/v1/users/{user_id}/inbox", {"path_parameters": {"user_id": "\u0000"}}),
    "NUL in a filter": ("GET", "/v1/deliveries", {"query": {"user_id": "\u0000", "type": "\u0000"}}),
    "a 40-character locale": (
        "PUT",
        "/v1/users/{user_id}",
        {"path_parameters": {"user_id": "u-1"}, "body": {"locale": "en" + "-abcdefgh" * 4}},
    ),
    "an email with a trailing newline": (
        "PUT",
        "/v1/users/{user_id}",
        {"path_parameters": {"user_id": "u-1"}, "body": {"email": "ann@example.com\n"}},
    ),
    "U+2028 in a subject": ("POST", "/v1/events", {"body": _event(data={**BOOKING, "property": "Sea\u2028view"})}),
}


@pytest.mark.parametrize("seed", SEEDS.values(), ids=SEEDS.keys())
def test_the_values_that_answered_500_answer_as_documented(
    seed: tuple[str, str, dict[str, Any]], live_api: LiveService
) -> None:
    method, path, given = seed
    operation = schema[path][method]
    body = given.get("body", NOT_SET)
    content = DOCUMENT["paths"][path][method.lower()].get("requestBody", {}).get("content", {})
    case = operation.Case(
        path_parameters=given.get("path_parameters"),
        query=given.get("query"),
        body=body,
        media_type=next(iter(content), None) if body is not NOT_SET else None,
    )
    cookie_only = "Cookie" in given.get("headers", {})  # a service key would be used instead of the cookie
    headers = {**({} if cookie_only else AUTH), **given.get("headers", {})}
    response = case.call_and_validate(base_url=live_api.url, headers=headers, checks=CHECKS)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])


async def test_the_fuzzed_document_is_the_one_the_service_serves(live_api: LiveService) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        served = (await client.get(f"{live_api.url}/openapi.json")).json()
    assert served == DOCUMENT
    assert sum(map(len, served["paths"].values())) >= 40  # every route, not a stub
