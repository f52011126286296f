"""The database goes away under the running service: every route that needs it answers 503 with Retry-After
(never 500), /metrics and /healthz keep answering, and everything works again once it is back.

A private PostgreSQL cluster is stopped and started (``pg_ctl``); under load its backends are also killed
(``pg_terminate_backend``) while requests are in flight.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from notifier import db
from notifier.api.openapi import ERRORS_BY_AUTH
from notifier.app import API_ROUTES
from tests.conftest import SERVICE_KEY, Service, booking_event, live_service, make_settings, running_service
from tests.reliability.conftest import PrivateCluster
from tests.reliability.test_database_faults import killing_backends

pytestmark = pytest.mark.postgres_only

PUBLIC_URL = "http://notifier.test"
SIGNING_KEY = "sig_outage_" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}


async def migrated_database(cluster: PrivateCluster) -> str:
    admin = await asyncpg.connect(cluster.dsn())
    await admin.execute('CREATE DATABASE "notifier"')
    await admin.close()
    url = cluster.url("notifier")
    engine = db.create_engine(url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()
    return url


def qstash_headers(body: bytes, path: str) -> dict[str, str]:
    """What QStash signs a call to ``path`` with (iss, sub = the URL, a fresh jti, body hash)."""
    now = int(time.time())
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    claims = {"iss": "Upstash", "sub": PUBLIC_URL + path, "exp": now + 300, "nbf": now - 5, "body": digest}
    claims["jti"] = f"jwt_{uuid.uuid4().hex}"
    signature = jwt.encode(claims, SIGNING_KEY, algorithm="HS256")
    return {"Upstash-Signature": signature, "Content-Type": "application/json"}


@dataclass
class Known:
    """Rows the requests name: an event, one of its deliveries, an inbox message."""

    event_id: str = ""
    delivery_id: str = ""
    message_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    method: str
    path: str  # with {event_id}, {delivery_id}, {message_id} filled from Known
    json: Any = None
    form: dict[str, str] | None = None
    content_type: str | None = None
    qstash: bool = False

    def request(self, client: httpx.AsyncClient, known: Known) -> Any:
        path = self.path.format(**known.__dict__)
        if self.qstash:
            text = json.dumps(self.json if self.json is not None else {})
            body = text.replace("{delivery_id}", known.delivery_id).encode()
            return client.request(self.method, path, content=body, headers=qstash_headers(body, path))
        headers = dict(AUTH)
        if self.content_type:
            headers["Content-Type"] = self.content_type
            return client.request(self.method, path, content=json.dumps(self.json).encode(), headers=headers)
        return client.request(self.method, path, json=self.json, data=self.form, headers=headers)


# One call per route that needs the database (the routes /openapi.json documents 503 for).
CALLS: dict[str, Call] = {
    "POST /v1/events": Call("POST", "/v1/events", json=booking_event(recipients=["u-1"])),
    "POST /v1/events/preview": Call("POST", "/v1/events/preview", json=booking_event(recipients=["u-1"])),
    "GET /v1/events": Call("GET", "/v1/events"),
    "GET /v1/events/{event_id}": Call("GET", "/v1/events/{event_id}"),
    "GET /v1/event-types": Call("GET", "/v1/event-types"),
    "PUT /v1/users/{user_id}": Call("PUT", "/v1/users/u-2", json={"name": "Bea"}),
    "GET /v1/users/{user_id}": Call("GET", "/v1/users/u-1"),
    "DELETE /v1/users/{user_id}": Call("DELETE", "/v1/users/u-3"),
    "GET /v1/users/{user_id}/preferences": Call("GET", "/v1/users/u-1/preferences"),
    "PUT /v1/users/{user_id}/preferences": Call("PUT", "/v1/users/u-1/preferences", json={}),
    "PATCH /v1/users/{user_id}/preferences": Call(
        "PATCH", "/v1/users/u-1/preferences", json={}, content_type="application/merge-patch+json"
    ),
    "GET /v1/users/{user_id}/preferences/history": Call("GET", "/v1/users/u-1/preferences/history"),
    "GET /v1/users/{user_id}/preferences/effective": Call("GET", "/v1/users/u-1/preferences/effective"),
    "GET /v1/organizations/{organization_id}/preferences": Call("GET", "/v1/organizations/o-1/preferences"),
    "PUT /v1/organizations/{organization_id}/preferences": Call("PUT", "/v1/organizations/o-1/preferences", json={}),
    "PATCH /v1/organizations/{organization_id}/preferences": Call(
        "PATCH", "/v1/organizations/o-1/preferences", json={}, content_type="application/merge-patch+json"
    ),
    "GET /v1/organizations/{organization_id}/preferences/history": Call(
        "GET", "/v1/organizations/o-1/preferences/history"
    ),
    "GET /v1/users/{user_id}/inbox": Call("GET", "/v1/users/u-1/inbox"),
    "POST /v1/users/{user_id}/inbox/read-all": Call("POST", "/v1/users/u-1/inbox/read-all"),
    "POST /v1/users/{user_id}/inbox/{message_id}/read": Call("POST", "/v1/users/u-1/inbox/{message_id}/read"),
    "POST /v1/users/{user_id}/inbox/{message_id}/unread": Call("POST", "/v1/users/u-1/inbox/{message_id}/unread"),
    "POST /v1/users/{user_id}/inbox/{message_id}/archive": Call("POST", "/v1/users/u-1/inbox/{message_id}/archive"),
    "GET /v1/deliveries": Call("GET", "/v1/deliveries"),
    "GET /v1/deliveries/{delivery_id}": Call("GET", "/v1/deliveries/{delivery_id}"),
    "POST /v1/deliveries/{delivery_id}/retry": Call("POST", "/v1/deliveries/{delivery_id}/retry"),
    "POST /inbox-demo/send": Call("POST", "/inbox-demo/send", form={"user_id": "u-1"}),
    "GET /dashboard": Call("GET", "/dashboard"),
    "POST /dashboard/logout": Call("POST", "/dashboard/logout"),
    "GET /dashboard/deliveries": Call("GET", "/dashboard/deliveries"),
    "GET /dashboard/deliveries/{delivery_id}": Call("GET", "/dashboard/deliveries/{delivery_id}"),
    "POST /dashboard/deliveries/{delivery_id}/retry": Call("POST", "/dashboard/deliveries/{delivery_id}/retry"),
    "POST /v1/qstash/deliveries/{delivery_id}": Call("POST", "/v1/qstash/deliveries/{delivery_id}", qstash=True),
    # A group no row belongs to: the route still reads the database to learn that.
    "POST /v1/qstash/groups/{group_id}": Call(
        "POST", "/v1/qstash/groups/6f1c2a9e-0d4b-4c1e-9a51-3b7f0c2d8e10", qstash=True
    ),
    "POST /v1/qstash/failures": Call(
        "POST", "/v1/qstash/failures", json={"url": PUBLIC_URL + "/v1/qstash/deliveries/{delivery_id}"}, qstash=True
    ),
    "POST /v1/qstash/cron/sweep": Call("POST", "/v1/qstash/cron/sweep", qstash=True),
    "POST /v1/qstash/cron/retention": Call("POST", "/v1/qstash/cron/retention", qstash=True),
}
# Routes documented with 503 that answer without the database (the catalog, a session ending, ...) still may.
WITHOUT_DATABASE = {"GET /v1/event-types", "POST /dashboard/logout"}


def test_the_table_covers_every_route_documented_with_503() -> None:
    documented = {f"{r.method} {r.path}" for r in API_ROUTES if 503 in ERRORS_BY_AUTH[r.auth]}
    assert set(CALLS) == documented


async def prepare(svc: Service) -> Known:
    """A user with an inbox message and a failed-able delivery, so every call names something that exists."""
    accepted = await svc.post_event(booking_event(recipients=["u-1"]))
    assert accepted.status_code == 202, accepted.text
    await svc.drain()
    known = Known(event_id=accepted.json()["event_id"])
    known.delivery_id = next(d["id"] for d in accepted.json()["deliveries"] if d["channel"] == "in_app")
    known.message_id = (await svc.get("/v1/users/u-1/inbox")).json()["data"][0]["id"]
    return known


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


async def test_every_route_that_needs_the_database_answers_503_while_it_is_down(
    private_postgres: PrivateCluster,
) -> None:
    url = await migrated_database(private_postgres)
    settings = make_settings(url, public_url=PUBLIC_URL, qstash_current_signing_key=SIGNING_KEY)
    async with running_service(settings) as svc:
        known = await prepare(svc)
        transport = httpx.ASGITransport(app=svc.app)  # nothing may escape the app: every answer is a problem
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL) as client:
            await asyncio.to_thread(private_postgres.pg_ctl, "stop", "-m", "fast")
            answers = {name: await call.request(client, known) for name, call in CALLS.items()}
            for name, response in answers.items():
                if name in WITHOUT_DATABASE and response.status_code < 500:
                    continue
                assert response.status_code == 503, (name, response.status_code, response.text)
                assert response.headers["content-type"] == "application/problem+json", name
                assert int(response.headers["retry-after"]) > 0, name
                assert response.json()["title"] == "Service not ready"
            ready = await client.get("/readyz")
            assert (ready.status_code, int(ready.headers["retry-after"])) == (503, 5)
            assert (await client.get("/healthz")).status_code == 200
            started = time.monotonic()
            scraped = await client.get("/metrics")
            assert scraped.status_code == 200
            assert time.monotonic() - started < 5
            figures = samples(scraped.text)
            assert figures["notifier_database_up"] == 0
            assert figures["process_resident_memory_bytes"] > 0  # the process, without the database
            backlog = [
                s for f in text_string_to_metric_families(scraped.text) for s in f.samples if "backlog" in s.name
            ]
            assert backlog == []  # not a count from before the outage

            await asyncio.to_thread(private_postgres.pg_ctl, "start")
            deadline = time.monotonic() + 30
            for name, call in CALLS.items():  # pooled connections died with the server: a 503 each, then fine
                while (response := await call.request(client, known)).status_code == 503:
                    assert time.monotonic() < deadline, (name, response.text)
                    await asyncio.sleep(0.1)
                assert response.status_code < 500, (name, response.text)
            assert samples((await client.get("/metrics")).text)["notifier_database_up"] == 1
            assert (await client.get("/readyz")).status_code == 200


async def test_connections_cut_mid_load_answer_only_2xx_or_503_and_recover(private_postgres: PrivateCluster) -> None:
    url = await migrated_database(private_postgres)
    settings = make_settings(url, claim_lease_seconds=1.0, retry_backoff_scale=0.0002)
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    stop = asyncio.Event()
    serial = iter(range(1_000_000))

    def load(client: httpx.AsyncClient, worker: int) -> Callable[[], Any]:
        calls = [
            lambda: client.post(
                "/v1/events", json=booking_event(idempotency_key=f"k-{next(serial)}", recipients=[f"u-{worker}"])
            ),
            lambda: client.get(f"/v1/users/u-{worker}/preferences"),
            lambda: client.put(f"/v1/users/u-{worker}/preferences", json={"channels": {"push": worker % 2 == 0}}),
            lambda: client.get("/v1/deliveries", params={"user_id": f"u-{worker}"}),
            lambda: client.get(f"/v1/users/u-{worker}/inbox"),
            lambda: client.get("/v1/events"),
        ]
        position = iter(range(1_000_000))
        return lambda: calls[next(position) % len(calls)]()

    async def run(client: httpx.AsyncClient, worker: int) -> None:
        call = load(client, worker)
        while not stop.is_set():
            try:
                response = await call()
            except httpx.TransportError as exc:  # the service itself must never drop a connection
                bad.append(f"transport {type(exc).__name__}")
                continue
            statuses[response.status_code] += 1
            if response.status_code >= 500 and response.status_code != 503:
                request = response.request
                bad.append(f"{request.method} {request.url.path}: {response.status_code} {response.text[:200]}")
            elif response.status_code == 503 and "retry-after" not in response.headers:
                bad.append(f"503 without Retry-After: {response.request.url.path}")

    with live_service(settings) as live:
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, trust_env=False, timeout=30) as client:
            workers = [asyncio.create_task(run(client, n)) for n in range(6)]
            await asyncio.sleep(1.0)
            async with killing_backends(private_postgres.dsn(), "notifier", every=0.2) as kills:
                await asyncio.sleep(2.0)
            await asyncio.to_thread(private_postgres.pg_ctl, "stop", "-m", "fast")
            await asyncio.sleep(1.5)
            await asyncio.to_thread(private_postgres.pg_ctl, "start")
            during = Counter(statuses)
            await asyncio.sleep(2.0)  # recovery: the pool replaces its dead connections
            statuses.clear()
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*workers)
            after = Counter(statuses)
            assert (await client.get("/readyz")).status_code == 200
    assert sum(kills) > 0, "no connection was killed"
    assert not bad, bad[:10]
    assert during[503] > 0, f"nothing was cut off: the test proved nothing ({during})"
    assert set(during) <= {200, 201, 202, 503}, during
    assert after, "no request was answered after the restart"
    assert set(after) <= {200, 201, 202}, after  # recovered: the last two seconds had no 503
