"""Hostile input: oversized, deeply nested, huge, badly encoded or mistyped bodies; SQL- and template-looking
strings; header injection. Every refusal is the documented problem+json, never a 5xx, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa

from notifier.db.models import Event, User
from tests.conftest import (
    SERVICE_KEY,
    Service,
    booking_event,
    live_service,
    make_settings,
    running_service,
    user_token,
)
from tests.fakes.smtp import SmtpServer
from tests.reliability.ledger import read_record

AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}
LIMIT = 262144  # NOTIFIER_MAX_BODY_BYTES default
BODY_ROUTES = [
    ("POST", "/v1/events"),
    ("POST", "/v1/events/preview"),
    ("PUT", "/v1/users/u-1"),
    ("PUT", "/v1/users/u-1/preferences"),
]


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert "type" in body
    return body


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One service under uvicorn (real HTTP, chunked uploads) for the body-shape tests of this module."""
    database = tmp_path_factory.mktemp("hostile") / "notifier.db"
    with live_service(make_settings(f"sqlite+aiosqlite:///{database}")) as service:
        yield service.url


@pytest.fixture
async def http(live: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live, headers=AUTH, trust_env=False, timeout=30) as client:
        yield client


async def events_stored(http: httpx.AsyncClient) -> int:
    return len((await http.get("/v1/events", params={"limit": 200})).json()["data"])


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_a_body_over_the_limit_is_413_with_a_content_length(
    http: httpx.AsyncClient, method: str, path: str
) -> None:
    oversized = b'{"type": "booking.confirmed", "data": {"x": "' + b"a" * (LIMIT + 10) + b'"}}'
    response = await http.request(method, path, content=oversized, headers={"Content-Type": "application/json"})
    body = assert_problem(response, 413)
    assert str(LIMIT) in body["detail"]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_a_body_over_the_limit_is_413_without_content_length(
    http: httpx.AsyncClient, method: str, path: str
) -> None:
    before = await events_stored(http)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"type": "booking.confirmed", "data": {"x": "'
        for _ in range(40):
            yield b"a" * 8192  # 320 KiB in all, sent chunked: the server only learns the size by reading
        yield b'"}}'

    request = http.build_request(method, path, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    assert_problem(await http.send(request), 413)
    assert await events_stored(http) == before


@pytest.mark.parametrize("depth", [40, 100_000])
async def test_deeply_nested_json_is_400(http: httpx.AsyncClient, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    raw = '{"type": "booking.confirmed", "recipients": ["u-1"], "data": {"deep": ' + nested + "}}"
    body = assert_problem(await http.post("/v1/events", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert "nests deeper" in body["detail"]


async def test_more_than_a_thousand_recipients_is_422(http: httpx.AsyncClient) -> None:
    before = await events_stored(http)
    response = await http.post("/v1/events", json=booking_event(recipients=[f"u-{i}" for i in range(1001)]))
    body = assert_problem(response, 422)
    assert ["recipients"] in [e["loc"] for e in body["errors"]]
    assert await events_stored(http) == before


@pytest.mark.parametrize(
    "raw", [b'{"type": "booking.confirmed", "data": {"guest_name": "\xff\xfe"}}', b"\xc3\x28", b'{"a": "\xed\xa0\x80"}']
)
async def test_invalid_utf8_is_400(http: httpx.AsyncClient, raw: bytes) -> None:
    body = assert_problem(await http.post("/v1/events", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert "UTF-8" in body["detail"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"])
async def test_a_body_that_is_not_declared_json_is_415(http: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    request = http.build_request("POST", "/v1/events", content=b'{"type": "booking.confirmed"}', headers=headers)
    assert request.headers.get("content-type") == content_type
    assert_problem(await http.send(request), 415)


SQL = [
    "' OR '1'='1",
    "1; DROP TABLE events; --",
    "x' UNION SELECT id, idempotency_key FROM events --",
    "\\'; DELETE FROM deliveries WHERE ''='",
    "%' OR 1=1 --",
]


@pytest.mark.parametrize("sql", SQL)
async def test_sql_looking_strings_in_filters_and_path_ids_are_data(service: Service, sql: str) -> None:
    accepted = await service.post_event(booking_event(idempotency_key=f"key {sql}", recipients=[sql]))
    assert accepted.status_code == 202, accepted.text
    event_id = accepted.json()["event_id"]
    for path, params in [
        ("/v1/events", {"type": sql}),
        ("/v1/deliveries", {"user_id": sql}),
        ("/v1/deliveries", {"type": sql, "user_id": sql}),
        ("/v1/deliveries", {"event_id": sql}),
        ("/v1/deliveries", {"status": sql}),
        ("/v1/events", {"cursor": sql}),
        (f"/v1/events/{quote(sql, safe='')}", {}),
        (f"/v1/deliveries/{quote(sql, safe='')}", {}),
        (f"/v1/users/{quote(sql, safe='')}/inbox", {"status": "all"}),
    ]:
        response = await service.get(path, params=params)
        assert response.status_code < 500, (path, params, response.text)
    # the only rows a filter finds are the ones whose value is literally that string
    by_user = (await service.get("/v1/deliveries", params={"user_id": sql})).json()["data"]
    assert {d["user_id"] for d in by_user} == {sql}
    assert len(by_user) == 2
    assert (await service.get("/v1/events", params={"type": sql})).json()["data"] == []
    stored = (await service.get(f"/v1/events/{event_id}")).json()
    assert (stored["idempotency_key"], stored["recipients"]) == (f"key {sql}", [sql])
    profile = await service.client.put(f"/v1/users/{quote(sql, safe='')}", json={"name": "Ann"}, headers=service.auth)
    assert profile.status_code == 200
    assert profile.json()["id"] == sql
    async with service.runtime.sessions() as session:  # every table is still there, with what it had
        assert (await session.execute(sa.select(sa.func.count()).select_from(Event))).scalar_one() == 1
        assert (await session.execute(sa.select(sa.func.count()).select_from(User))).scalar_one() == 1


TEMPLATES = {
    "guest_name": "{{ 7*7 }}",
    "property": "{% for x in range(3) %}loop{% endfor %}",
    "check_in": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "booking_id": "{{ config }}{# comment #}",
}


async def test_template_looking_data_is_rendered_literally(service: Service) -> None:
    response = await service.post_event(booking_event(data=TEMPLATES))
    assert response.status_code == 202, response.text
    await service.drain()
    [item] = (await service.get("/v1/users/user-1/inbox")).json()["data"]
    assert item["title"] == "Booking confirmed: {% for x in range(3) %}loop{% endfor %}"
    assert item["body"] == (
        "{{ 7*7 }} is booked into {% for x in range(3) %}loop{% endfor %} from "
        "{{ ''.__class__.__mro__[1].__subclasses__() }}."
    )
    assert "49" not in item["body"]
    assert "looplooploop" not in item["title"]
    assert item["action_url"] == "/bookings/{{ config }}{# comment #}"
    assert {k: item["data"][k] for k in TEMPLATES} == TEMPLATES


INJECTIONS = [
    {"id": "u-1", "email": "ann@example.com", "name": "Ann\r\nBcc: evil@example.com"},
    {"id": "u-1", "email": "ann@example.com\r\nBcc: evil@example.com"},
    {"id": "u-1", "email": "ann@example.com\nBcc: evil@example.com"},
    {"id": "u-1", "email": "ann@example.com", "name": "Ann\nSubject: hi"},
]


@pytest.mark.parametrize("recipient", INJECTIONS)
async def test_line_breaks_in_email_fields_are_422_at_ingest(service: Service, recipient: dict[str, str]) -> None:
    body = assert_problem(await service.post_event(booking_event(recipients=[recipient])), 422)
    assert body["errors"][0]["loc"][:2] == ["recipients", 0]
    profile = {k: v for k, v in recipient.items() if k != "id"}
    assert_problem(await service.client.put("/v1/users/u-1", json=profile, headers=service.auth), 422)
    async with service.runtime.sessions() as session:
        assert (await session.execute(sa.select(sa.func.count()).select_from(User))).scalar_one() == 0


@pytest.mark.parametrize("user", [{"name": "Ann\r\nBcc: evil@example.com"}, {"email": "a@example.com\r\nBcc: e@x.io"}])
async def test_the_smtp_channel_refuses_line_breaks_that_reached_the_database_anyway(
    database_url: str, smtp_server: SmtpServer, user: dict[str, str]
) -> None:
    settings = make_settings(
        database_url,
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        smtp_from="n@example.com",
        smtp_starttls=False,
    )
    async with running_service(settings) as svc:
        # written behind the API's back (an older version, a manual fix): the channel is the last line
        async with svc.runtime.sessions() as session, session.begin():
            session.add(User(id="u-1", email=user.get("email", "ann@example.com"), name=user.get("name")))
        response = await svc.post_event(booking_event(recipients=["u-1"]))
        assert response.status_code == 202, response.text
        await svc.drain()
    record = await read_record(database_url)
    [email] = record.of("email")
    assert (email.status, email.reason) == ("failed", "rejected")
    assert "line break" in (email.last_error or "")
    assert smtp_server.sessions == 0
    assert smtp_server.messages == []


@pytest.fixture
async def broken_service(tmp_path: Path) -> AsyncIterator[tuple[Service, Path]]:
    database = tmp_path / "throwaway.db"
    async with running_service(make_settings(f"sqlite+aiosqlite:///{database}")) as svc:
        yield svc, database


async def test_an_internal_error_answers_the_generic_problem_without_trace_or_sql(
    broken_service: tuple[Service, Path], caplog: pytest.LogCaptureFixture
) -> None:
    svc, database = broken_service
    accepted = await svc.post_event(booking_event())
    assert accepted.status_code == 202
    await svc.drain()

    def break_the_schema() -> None:
        with sqlite3.connect(database) as conn:
            conn.execute("DROP TABLE delivery_transitions")
            conn.execute("DROP TABLE deliveries")
            conn.execute("DROP TABLE events")

    # Under the running service, from a thread: blocking the event loop here would stall a claim the feeder began
    # (its BEGIN IMMEDIATE holds SQLite's write lock until the loop lets it commit), and the DROP would wait out
    # sqlite3's 5 s busy timeout: "database is locked" on an overloaded machine.
    await asyncio.to_thread(break_the_schema)
    transport = httpx.ASGITransport(app=svc.app)  # raises whatever escapes the app: nothing may
    async with httpx.AsyncClient(transport=transport, base_url="http://notifier.test", headers=AUTH) as client:
        responses = [
            await client.get("/v1/events"),
            await client.get(f"/v1/events/{accepted.json()['event_id']}"),
            await client.get("/v1/deliveries", params={"user_id": "user-1"}),
            await client.post("/v1/events", json=booking_event(idempotency_key="after-the-break")),
        ]
    for response in responses:
        body = assert_problem(response, 500)
        assert body == {
            "type": "about:blank",
            "title": "Internal error",
            "status": 500,
            "detail": "the service could not complete the request",
        }
        text = response.text.lower()
        for leak in ("traceback", "select", "insert", "sqlite", "no such table", "deliveries", 'file "', ".py"):
            assert leak not in text, (leak, response.text)
    assert any("OperationalError" in r.getMessage() for r in caplog.records)  # the log knows what happened


async def test_an_internal_error_leaves_the_keep_alive_connection_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's next request on the same connection is answered: the server closes nothing after a 500.

    A raw socket, not httpx: httpx quietly opens a new connection when it sees the old one closed, and a
    closed one under a request already sent (QStash, a load balancer reusing it) is exactly the failure.
    """
    database = tmp_path / "throwaway.db"
    with live_service(make_settings(f"sqlite+aiosqlite:///{database}")) as service:
        with sqlite3.connect(database) as conn:
            conn.execute("DROP TABLE delivery_transitions")
            conn.execute("DROP TABLE deliveries")
            conn.execute("DROP TABLE events")
        host, port = httpx.URL(service.url).host, httpx.URL(service.url).port
        reader, writer = await asyncio.open_connection(host, port)
        try:
            statuses = []
            for _ in range(3):
                request = f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {SERVICE_KEY}\r\n\r\n"
                writer.write(request.encode())
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
                headers = dict(
                    line.split(": ", 1) for line in head.decode("latin-1").lower().split("\r\n")[1:] if ": " in line
                )
                await reader.readexactly(int(headers["content-length"]))
                assert headers.get("connection") != "close", head
                statuses.append(int(head.split()[1]))
                await asyncio.sleep(0.1)  # time for a close after the answer to reach this side
        finally:
            writer.close()
    assert statuses == [500, 500, 500]
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    assert any("OperationalError" in r.getMessage() for r in caplog.records)  # logged once, by us


async def test_an_internal_error_on_an_inbox_route_is_readable_by_an_allowed_page(tmp_path: Path) -> None:
    database, origin = tmp_path / "throwaway.db", "https://app.example.com"
    settings = make_settings(f"sqlite+aiosqlite:///{database}", cors_origins=[origin])
    async with running_service(settings) as svc:
        with sqlite3.connect(database) as conn:
            conn.execute("DROP TABLE inbox_messages")
        headers = {"Authorization": f"Bearer {user_token('user-1')}", "Origin": origin}
        response = await svc.client.get("/v1/users/user-1/inbox", headers=headers)
    assert_problem(response, 500)
    assert response.headers["access-control-allow-origin"] == origin  # the page sees the 500, not a CORS error
