"""Structured logs: one JSON line per request and per attempt transition; no secret or message body at INFO."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import logging.handlers
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import DeliveryTransition
from notifier.logs import JsonFormatter, configure_logging
from tests.api.test_deliveries import payment
from tests.conftest import SERVICE_KEY, USER_JWT_SECRET, Service, user_token
from tests.db_faults import REFUSAL, inserts_refused
from tests.fakes.base import Fault
from tests.fakes.onesignal import OneSignalFake

SECRET_PAYER = "Zanzibar Quillfeather"  # appears only in the event data and so in the rendered message body


class LogCapture:
    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream
        self.raw = ""

    def read(self) -> list[dict[str, Any]]:
        """Everything logged since the last read; every line must be one JSON object."""
        text = self._stream.getvalue()[len(self.raw) :]
        self.raw += text
        parsed = [json.loads(line) for line in text.splitlines()]
        assert all(isinstance(entry, dict) for entry in parsed)
        return parsed


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """The production set-up (``configure_logging``), its stderr handler pointed at a buffer; restored afterwards."""
    root = logging.getLogger()
    named = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "aiosqlite", "asyncio")
    saved = (root.handlers[:], root.level, {n: vars(logging.getLogger(n)).copy() for n in named})
    record_flags = ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile")
    saved_flags = {name: getattr(logging, name) for name in record_flags}
    configure_logging("INFO")
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert isinstance(handler.formatter, JsonFormatter)
    stream = io.StringIO()
    handler.setStream(stream)
    try:
        yield LogCapture(stream)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, value in saved_flags.items():
            setattr(logging, name, value)
        for name, state in saved[2].items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = state["handlers"], state["propagate"]
            logger.disabled, logger.level = state["disabled"], state["level"]


def request_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["logger"] == "notifier.http"]


async def test_one_line_per_request_with_id_route_status_and_duration(service: Service, logs: LogCapture) -> None:
    event = await service.post_event(payment("user-1"))
    listed = await service.get(
        "/v1/deliveries", params={"channel": "in_app", "limit": "5"}
    )  # any status: a worker may be quick
    delivery_id = listed.json()["data"][0]["id"]
    one = await service.client.get(f"/v1/deliveries/{delivery_id}", headers={**service.auth, "X-Request-ID": "req-42"})
    missing = await service.get("/no/such/path")
    responses = [(event, "POST", "/v1/events", 202), (listed, "GET", "/v1/deliveries", 200),
                 (one, "GET", "/v1/deliveries/{delivery_id}", 200), (missing, "GET", "unmatched", 404)]  # fmt: skip

    lines = request_lines(logs.read())
    assert len(lines) == len(responses)
    for line, (response, method, route, status) in zip(lines, responses, strict=True):
        assert response.status_code == status
        assert line["request_id"] == response.headers["x-request-id"]
        assert (line["method"], line["route"], line["status"]) == (method, route, status)
        assert isinstance(line["duration_ms"], float)
        assert 0 <= line["duration_ms"] < 10_000
        assert line["level"] == "info"
    assert lines[2]["request_id"] == "req-42"  # a caller's safe request id is kept
    assert delivery_id not in json.dumps(lines[2])  # the route template, never the concrete path


async def test_one_line_per_attempt_transition_with_ids_attempt_and_elapsed(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]],
    onesignal_fake: OneSignalFake,
    logs: LogCapture,
) -> None:
    onesignal_fake.fail_next(Fault.http(500), Fault.http(400))
    async with service_factory(
        onesignal_app_id=onesignal_fake.app_id,
        onesignal_rest_api_key=onesignal_fake.api_key,
        onesignal_api_url=onesignal_fake.url,
    ) as svc:
        event_id = (await svc.post_event(payment("user-1"))).json()["event_id"]
        await svc.drain()
        [push] = (await svc.get("/v1/deliveries", params={"channel": "push"})).json()["data"]
        assert push["status"] == "failed"  # 500 (retry), then 400 (rejected)
        assert (await svc.client.post(f"/v1/deliveries/{push['id']}/retry", headers=svc.auth)).status_code == 202
        await svc.drain()
        async with svc.runtime.sessions() as session:
            rows = await session.execute(
                sa.select(DeliveryTransition)
                .where(col(DeliveryTransition.delivery_id) == uuid.UUID(push["id"]))
                .order_by(col(DeliveryTransition.at))
            )
            moves = [(t.from_status, t.to_status) for t in rows.scalars()]

    entries = logs.read()
    # Every status change writes one transition row and logs exactly one line, in the same order.
    logged = [e for e in entries if e.get("delivery_id") == push["id"] and e["logger"] == "notifier.delivery"]
    assert [(e["from_status"], e["to_status"]) for e in logged] == moves
    assert moves[0] == (None, "queued")
    assert ("failed", "queued") in moves
    for entry in logged:
        assert entry["event_id"] == event_id
        assert entry["channel"] == "push"
    outcomes = [e for e in logged if e["from_status"] == "sending"]
    assert [e["to_status"] for e in outcomes] == ["queued", "failed", "sent"]  # 500 (retry), 400, then the retry
    assert [e["attempt"] for e in outcomes] == [1, 2, 3]
    assert [e["http_status"] for e in outcomes] == [500, 400, 200]
    assert all(isinstance(e["elapsed_ms"], float) and e["elapsed_ms"] >= 0 for e in outcomes)
    assert [e["via"] for e in logged if e["from_status"] == "failed"] == ["operator"]


async def test_no_secret_or_message_body_is_logged(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]],
    onesignal_fake: OneSignalFake,
    logs: LogCapture,
) -> None:
    token = user_token("user-1")
    forged = user_token("user-1", secret="another-secret-of-at-least-32-characters!")
    onesignal_fake.fail_next(Fault.http(500))
    async with service_factory(
        onesignal_app_id=onesignal_fake.app_id,
        onesignal_rest_api_key=onesignal_fake.api_key,
        onesignal_api_url=onesignal_fake.url,
    ) as svc:
        assert (
            await svc.post_event(payment("user-1", data={**payment()["data"], "payer_name": SECRET_PAYER}))
        ).status_code == 202
        await svc.drain()
        inbox = await svc.client.get("/v1/users/user-1/inbox", headers={"Authorization": f"Bearer {token}"})
        assert inbox.status_code == 200
        assert SECRET_PAYER in inbox.text  # the body exists, so its absence from the logs means something
        assert (await svc.client.get(f"/v1/users/user-1/inbox?token={token}&access_token={token}")).status_code == 401
        forged_call = await svc.client.get("/v1/users/user-1/inbox", headers={"Authorization": f"Bearer {forged}"})
        assert forged_call.status_code == 401
        wrong_key = await svc.client.get("/v1/deliveries", headers={"Authorization": f"Bearer {SERVICE_KEY}x"})
        assert wrong_key.status_code == 401
        assert (await svc.get(f"/v1/deliveries?user_id=user-1&token={token}")).status_code == 200

    entries = logs.read()
    assert len(request_lines(entries)) == 6
    assert any(e["logger"] == "notifier.delivery" for e in entries)
    assert any(e["msg"].startswith("refused") for e in entries)  # refusals are logged, without the credential
    for secret in (SERVICE_KEY, token, forged, token.split(".")[2], USER_JWT_SECRET, onesignal_fake.api_key,
                   SECRET_PAYER, "paid 120.00 EUR"):  # fmt: skip
        assert secret not in logs.raw


async def test_a_database_error_is_logged_once_by_class_and_codes_without_its_values(
    service: Service, logs: LogCapture
) -> None:
    address = "private.address@example.com"
    kept = logging.handlers.BufferingHandler(capacity=1000)  # the records themselves, whole tracebacks included
    logging.getLogger().addHandler(kept)
    try:
        async with inserts_refused(service.runtime.engine, "users"):
            response = await service.client.put("/v1/users/u-9", json={"email": address}, headers=service.auth)
    finally:
        logging.getLogger().removeHandler(kept)
    assert response.status_code == 500, response.text
    [traced] = [r for r in kept.buffer if r.exc_info]
    assert "INSERT INTO users" in logging.Formatter().formatException(traced.exc_info)  # the statement, ...
    assert address not in logging.Formatter().formatException(traced.exc_info)  # ... never its values

    entries = logs.read()
    [failure] = [e for e in entries if e["level"] == "error"]
    kind = "IntegrityError" if service.runtime.engine.dialect.name == "sqlite" else "DBAPIError"  # as each driver says
    assert failure["msg"] == f"unhandled {kind} on PUT /v1/users/u-9"
    assert failure["error"].startswith(f"sqlalchemy.exc.{kind}: ")  # not the trailing "Background ..." link
    code = "SQLITE_CONSTRAINT_TRIGGER" if kind == "IntegrityError" else "SQLSTATE P0001"  # the trigger's refusal
    assert code in failure["error"]
    assert REFUSAL not in failure["error"]  # the driver's message: it may quote values (see below)
    assert [e["status"] for e in request_lines(entries)] == [500]
    assert address not in logs.raw
    assert address not in response.text


async def test_a_database_error_whose_message_quotes_a_bound_value_is_logged_without_it(
    service: Service, logs: LogCapture
) -> None:
    """hide_parameters keeps the values out of SQLAlchemy's own text, not out of the driver's message: asyncpg
    quotes a value it cannot encode ("invalid input for query argument $2: '...'"), and so can the database.
    Here a trigger quotes the bound address in its refusal (SQLite's RAISE takes only a literal: the same text)."""
    address = "quoted.address@example.com"
    engine = service.runtime.engine
    if engine.dialect.name == "sqlite":
        create = [f"CREATE TRIGGER quote_users BEFORE INSERT ON users BEGIN SELECT RAISE(ABORT, 'bad: {address}'); END"]
        drop = ["DROP TRIGGER quote_users"]
    else:
        create = [
            "CREATE FUNCTION quote_users() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'bad: %', NEW.email; END $$",
            "CREATE TRIGGER quote_users BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION quote_users()",
        ]
        drop = ["DROP TRIGGER quote_users ON users", "DROP FUNCTION quote_users()"]
    async with engine.begin() as conn:
        for statement in create:
            await conn.execute(sa.text(statement))
    try:
        response = await service.client.put("/v1/users/u-9", json={"email": address}, headers=service.auth)
    finally:
        async with engine.begin() as conn:
            for statement in drop:
                await conn.execute(sa.text(statement))

    assert response.status_code == 500, response.text
    [failure] = [e for e in logs.read() if e["level"] == "error"]
    assert failure["msg"].endswith(" on PUT /v1/users/u-9")
    assert "(message not logged: it may quote the statement's values)" in failure["error"], failure["error"]
    assert address not in logs.raw
    assert address not in response.text
