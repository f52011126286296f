"""Concurrency: identical events at once, one key with different bodies, and replicas that never double-claim."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import Counter
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import DeliveryTransition
from notifier.types import TERMINAL_STATUSES
from tests.conftest import SERVICE_KEY, live_service, make_settings, running_service
from tests.fakes.base import Fault
from tests.fakes.onesignal import OneSignalFake
from tests.reliability.faults import Late, in_front_of, onesignal_key_of
from tests.reliability.ledger import (
    Providers,
    assert_exactly_once,
    db_session,
    eventually,
    onesignal_key,
    payment_event,
    read_record,
    unit_of,
)

AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}


async def post_all(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body at once over as many connections as there are bodies."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30, trust_env=False) as client:
        start = asyncio.Event()

        async def post(body: dict[str, Any]) -> httpx.Response:
            await start.wait()
            return await client.post("/v1/events", json=body, headers=AUTH)

        tasks = [asyncio.create_task(post(body)) for body in bodies]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


async def test_fifty_identical_events_at_once_make_one_event(database_url: str) -> None:
    body = payment_event("same-key", "u-1", "u-2")
    with live_service(make_settings(database_url)) as live:
        responses = await post_all(live.url, [body] * 50)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 1, 200: 49}, [r.text for r in responses if r.status_code not in (200, 202)]
    answers = [r.json() for r in responses]
    assert {a["event_id"] for a in answers} == {answers[0]["event_id"]}
    assert [a["duplicate"] for a in answers].count(False) == 1
    # every answer names the same deliveries as the one that created them
    assert len({tuple(sorted(d["id"] for d in a["deliveries"])) for a in answers}) == 1
    record = await read_record(database_url)
    assert len(record.events) == 1
    assert len(record.deliveries) == 6  # 2 users x push, email, in_app
    assert Counter((d.user_id, d.channel) for d in record.deliveries).most_common(1)[0][1] == 1


async def test_one_key_with_different_bodies_at_once_is_accepted_once(database_url: str) -> None:
    variants = [
        payment_event("contested", "u-1", data={**payment_event("x")["data"], "amount": str(n)}) for n in range(3)
    ]
    bodies = [variants[i % 3] for i in range(30)]
    with live_service(make_settings(database_url)) as live:
        responses = await post_all(live.url, bodies)
    [winner] = [body for body, r in zip(bodies, responses, strict=True) if r.status_code == 202]
    for body, response in zip(bodies, responses, strict=True):
        if body is winner:
            assert response.status_code in (200, 202), response.text
            assert response.json()["duplicate"] is (response.status_code == 200)
        else:
            assert response.status_code == 409, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert "contested" in response.json()["detail"]
    record = await read_record(database_url)
    [event] = record.events
    assert event.data["amount"] == winner["data"]["amount"]
    assert len(record.deliveries) == 3


@pytest.mark.postgres_only
async def test_concurrent_events_naming_the_same_users_in_opposite_orders_are_all_accepted(postgres_url: str) -> None:
    users = [{"id": f"u-{i}", "email": f"u-{i}@example.com", "name": f"User {i}"} for i in range(6)]
    bodies = [payment_event(f"order-{n}", recipients=users if n % 2 else users[::-1]) for n in range(16)]
    with live_service(make_settings(postgres_url)) as live:
        responses = await post_all(live.url, bodies)
    assert Counter(r.status_code for r in responses) == {202: 16}, [r.text for r in responses if r.status_code != 202]


def stress_script(key: str, n: int) -> Fault | Late | None:
    """A third of the deliveries meet a 503 first, a third a slow 200, the rest a normal 200."""
    kind = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 3
    if n == 1 and kind == 0:
        return Fault.http(503)
    if n == 1 and kind == 1:
        return Late(0.05)
    return None


@pytest.mark.postgres_only
async def test_two_replicas_under_latency_and_failures_never_attempt_a_delivery_twice_at_once(
    postgres_url: str, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.latency = 0.02
    with in_front_of(onesignal_fake.app, onesignal_key_of, stress_script) as (url, wrapper):
        providers = Providers(onesignal=onesignal_fake)
        settings = make_settings(
            postgres_url, workers=8, retry_backoff_scale=0.0002, **(providers.settings() | {"onesignal_api_url": url})
        )
        async with running_service(settings) as first, running_service(settings) as second:
            bodies = [payment_event(f"stress-{i}", *(f"u-{i}-{j}" for j in range(3))) for i in range(20)]
            responses = await asyncio.gather(
                *((first if i % 2 else second).post_event(body) for i, body in enumerate(bodies))
            )
            assert all(r.status_code == 202 for r in responses)
            await asyncio.gather(first.drain(60), second.drain(60))
    record = await read_record(postgres_url)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))
    pushes = record.of("push")
    assert len(pushes) == 60
    assert not wrapper.overlapping, f"deliveries with two provider calls in flight at once: {wrapper.overlapping}"
    for push in pushes:
        attempts = record.attempts_of(push.id)
        expected = 2 if isinstance(stress_script(onesignal_key(unit_of(push)), 1), Fault) else 1
        assert [a.number for a in attempts] == list(range(1, expected + 1)), push.id
        assert push.attempts == expected
        assert all(a.outcome in ("retry", "sent") for a in attempts)
        for earlier, later in itertools.pairwise(attempts):
            assert earlier.finished_at is not None
            assert earlier.finished_at <= later.started_at
    # one provider request per attempt of a send group (each event's three pushes): no attempt was made that
    # the database does not know of
    assert len({unit_of(p) for p in pushes}) == 20
    assert sum(wrapper.seen.values()) == sum({unit_of(p): p.attempts for p in pushes}.values())
    assert all(d.status in TERMINAL_STATUSES for d in record.deliveries)


async def test_an_attempt_that_outlived_its_lease_cannot_overwrite_the_new_owner(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    # The first call of every push hangs past the claim lease and then fails; meanwhile the lease runs
    # out, another claim takes the delivery over and sends it. The stale attempt's late "retry" must
    # not move the sent delivery back to queued (its fencing token no longer matches).
    slow_failure = Fault(status=503, body={"errors": ["slow"]}, hang_seconds=1.5)
    with in_front_of(onesignal_fake.app, onesignal_key_of, lambda key, n: slow_failure if n == 1 else None) as (
        url,
        wrapper,
    ):
        providers = Providers(onesignal=onesignal_fake)
        settings = make_settings(
            database_url,
            workers=4,
            claim_lease_seconds=0.5,
            provider_timeout_seconds=5,
            retry_backoff_scale=0.0002,
            **(providers.settings() | {"onesignal_api_url": url}),
        )
        async with running_service(settings) as svc:
            for i in range(3):
                assert (await svc.post_event(payment_event(f"lease-{i}", f"u-{i}"))).status_code == 202
            await eventually(lambda: sum(wrapper.seen.values()) >= 6, timeout=30, what="every push taken over")
            await eventually(lambda: all(v == 0 for v in wrapper.in_flight.values()), timeout=30, what="stale calls")
            await svc.drain(10)
    record = await read_record(database_url)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))
    for push in record.of("push"):
        assert push.attempts == 2, [(a.number, a.outcome) for a in record.attempts_of(push.id)]
        async with db_session(database_url) as session:
            rows = await session.execute(
                sa.select(DeliveryTransition.from_status, DeliveryTransition.to_status)
                .where(col(DeliveryTransition.delivery_id) == push.id)
                .order_by(col(DeliveryTransition.at))
            )
            moves = [tuple(r) for r in rows]
        assert ("sent", "queued") not in moves, moves  # a terminal row never comes back
        assert moves[-1] == ("sending", "sent"), moves
