"""GET /v1/deliveries (filters, pagination), the attempt timeline, and operator retry — SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from notifier.db import deliveries
from notifier.db.models import DeliveryTransition
from tests.conftest import Service, booking_event
from tests.fakes.base import Fault
from tests.fakes.onesignal import OneSignalFake

ServiceFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


def payment(*recipients: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "payment.received",
        "recipients": list(recipients),
        "data": {"payment_id": "p-1", "amount": "120.00", "currency": "EUR", "payer_name": "Ann Lee"},
    }
    body.update(overrides)
    return body


@pytest.fixture
async def pushing(service_factory: ServiceFactory, onesignal_fake: OneSignalFake) -> AsyncIterator[Service]:
    """The app with push live against the OneSignal fake (email stays unconfigured: suppressed)."""
    async with service_factory(
        onesignal_app_id=onesignal_fake.app_id,
        onesignal_rest_api_key=onesignal_fake.api_key,
        onesignal_api_url=onesignal_fake.url,
    ) as svc:
        yield svc


async def listing(svc: Service, **params: str) -> list[dict[str, Any]]:
    response = await svc.get("/v1/deliveries", params={"limit": "200", **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next_cursor"] is None
    return list(body["data"])


async def post(svc: Service, body: dict[str, Any]) -> str:
    response = await svc.post_event(body)
    assert response.status_code == 202, response.text
    return str(response.json()["event_id"])


async def test_filters_narrow_the_listing(pushing: Service, onesignal_fake: OneSignalFake) -> None:
    onesignal_fake.forget("user-2")  # OneSignal does not know user-2: that push fails (not_subscribed)
    booking = await post(pushing, booking_event(recipients=["user-1"]))
    paid = await post(pushing, payment("user-1", "user-2"))
    await pushing.drain()

    everything = await listing(pushing)
    assert len(everything) == 8  # booking: in_app + email; payment: (push, email, in_app) x 2 users
    created = [dt.datetime.fromisoformat(d["created_at"]) for d in everything]
    assert created == sorted(created, reverse=True)
    paid_at = min(d["created_at"] for d in everything if d["event_id"] == paid)

    def ids(rows: list[dict[str, Any]]) -> list[str]:
        return [row["id"] for row in rows]

    cases: list[tuple[dict[str, str], Callable[[dict[str, Any]], bool], int]] = [
        ({"user_id": "user-2"}, lambda d: d["user_id"] == "user-2", 3),
        ({"event_id": booking}, lambda d: d["event_id"] == booking, 2),
        ({"status": "failed"}, lambda d: d["status"] == "failed", 1),
        ({"status": "sent", "channel": "push"}, lambda d: (d["status"], d["channel"]) == ("sent", "push"), 1),
        ({"channel": "email"}, lambda d: d["channel"] == "email", 3),
        ({"type": "booking.confirmed"}, lambda d: d["event_type"] == "booking.confirmed", 2),
        ({"type": "payment.received", "user_id": "user-1"},
         lambda d: (d["event_type"], d["user_id"]) == ("payment.received", "user-1"), 3),
        ({"since": paid_at}, lambda d: d["event_id"] == paid, 6),
        ({"status": "suppressed", "channel": "in_app"}, lambda d: False, 0),
    ]  # fmt: skip
    for params, predicate, count in cases:
        found = await listing(pushing, **params)
        assert ids(found) == ids([d for d in everything if predicate(d)]), params
        assert len(found) == count, params

    [failed] = await listing(pushing, status="failed")
    assert (failed["user_id"], failed["channel"], failed["reason"]) == ("user-2", "push", "not_subscribed")
    assert failed["attempt_count"] == 1
    assert failed["provider"] == "onesignal"


async def test_bad_filters_are_422_naming_each_one(service: Service) -> None:
    response = await service.get(
        "/v1/deliveries",
        params={"status": "bogus", "channel": "sms", "event_id": "e-1", "since": "yesterday", "limit": "0"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    errors = {tuple(e["loc"]): e["msg"] for e in response.json()["errors"]}
    assert set(errors) == {("query", name) for name in ("status", "channel", "event_id", "since", "limit")}
    assert "'bogus'" in errors[("query", "status")]
    assert "'sms'" in errors[("query", "channel")]
    assert "queued" in errors[("query", "status")]  # the message lists what is known


async def test_listing_needs_a_service_key(service: Service) -> None:
    assert (await service.client.get("/v1/deliveries")).status_code == 401
    missing = await service.get("/v1/deliveries/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert (await service.get("/v1/deliveries/not-a-uuid")).status_code == 404


async def test_pagination_is_stable_while_deliveries_are_inserted(service: Service) -> None:
    for n in range(3):
        await post(service, booking_event(recipients=[f"user-{n}-{i}" for i in range(3)]))
    expected = [d["id"] for d in await listing(service)]
    assert len(expected) == 18  # 3 events x 3 users x (in_app, email)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "4", **({"cursor": cursor} if cursor else {})}
        # Each page is fetched while another event is being inserted.
        page, _ = await asyncio.gather(
            service.get("/v1/deliveries", params=params),
            post(service, booking_event(recipients=[f"late-{pages}"])),
        )
        assert page.status_code == 200, page.text
        seen.extend(d["id"] for d in page.json()["data"])
        cursor = page.json()["next_cursor"]
        pages += 1
        if cursor is None:
            break
    now = await listing(service)
    assert len(now) == len(expected) + 2 * pages  # every concurrent insert landed (in_app + email each)
    # New rows sort before the first page: the walk sees every row that existed, once, in order, and at most
    # the rows of the insert that raced the first page.
    assert seen[-len(expected) :] == expected
    early = seen[: -len(expected)]
    late_0 = {d["id"] for d in now if d["user_id"] == "late-0"}
    assert set(early) <= late_0
    assert len(seen) == len(set(seen))
    assert pages == 5  # 18 rows (+ up to 2 early ones) at 4 a page


async def test_timeline_of_a_delivery_retried_after_two_provider_errors(
    pushing: Service, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.fail_next(Fault.http(500), Fault.http(500))
    event_id = await post(pushing, payment("user-1"))
    await pushing.drain()
    [push] = await listing(pushing, event_id=event_id, channel="push")
    assert push["status"] == "sent"

    response = await pushing.get(f"/v1/deliveries/{push['id']}")
    assert response.status_code == 200
    detail = response.json()
    assert detail["attempt_count"] == 3
    attempts = detail["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "sent"]
    assert [a["http_status"] for a in attempts] == [500, 500, 200]
    assert [a["via"] for a in attempts] == ["local"] * 3
    [created] = onesignal_fake.sent_to("user-1")
    assert [a["provider_message_id"] for a in attempts] == [None, None, created.id]
    assert detail["provider_message_id"] == created.id
    assert all("500" in a["error"] and "scripted 500" in a["error"] for a in attempts[:2])
    assert attempts[2]["error"] is None
    for attempt in attempts:
        started = dt.datetime.fromisoformat(attempt["started_at"])
        finished = dt.datetime.fromisoformat(attempt["finished_at"])
        assert attempt["duration_ms"] == pytest.approx((finished - started).total_seconds() * 1000, abs=0.1)
    starts = [a["started_at"] for a in attempts]
    assert starts == sorted(starts)

    moves = [(t["from"], t["to"]) for t in detail["transitions"]]
    assert moves == [
        (None, "queued"),
        ("queued", "sending"), ("sending", "queued"),
        ("queued", "sending"), ("sending", "queued"),
        ("queued", "sending"), ("sending", "sent"),
    ]  # fmt: skip
    assert detail["transitions"][1]["note"] == "attempt 1 via local"
    assert "scripted 500" in detail["transitions"][2]["note"]


async def refused_push(pushing: Service, onesignal_fake: OneSignalFake) -> tuple[str, dict[str, Any]]:
    """A payment event whose push OneSignal refused for good (400): its id and the push as listed, ``failed``."""
    onesignal_fake.fail_next(Fault.http(400, {"errors": ["Notification content must not be null"]}))
    event_id = await post(pushing, payment("user-1"))
    await pushing.drain()
    [push] = await listing(pushing, event_id=event_id, channel="push")
    assert (push["status"], push["reason"]) == ("failed", "rejected")
    return event_id, push


async def test_retry_is_409_unless_failed_and_a_failed_delivery_then_gets_sent(
    pushing: Service, onesignal_fake: OneSignalFake
) -> None:
    event_id, push = await refused_push(pushing, onesignal_fake)
    [inbox] = await listing(pushing, event_id=event_id, channel="in_app")
    assert inbox["status"] == "sent"

    refused = await pushing.client.post(f"/v1/deliveries/{inbox['id']}/retry", headers=pushing.auth)
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert "sent" in refused.json()["detail"]
    missing = await pushing.client.post(
        "/v1/deliveries/00000000-0000-0000-0000-000000000000/retry", headers=pushing.auth
    )
    assert missing.status_code == 404
    assert (await pushing.client.post(f"/v1/deliveries/{push['id']}/retry")).status_code == 401

    accepted = await pushing.client.post(f"/v1/deliveries/{push['id']}/retry", headers=pushing.auth)
    assert accepted.status_code == 202, accepted.text
    assert (accepted.json()["id"], accepted.json()["status"], accepted.json()["reason"]) == (push["id"], "queued", None)
    assert accepted.json()["transitions"][-1]["note"] == "retried by an operator"

    await pushing.drain()
    detail = (await pushing.get(f"/v1/deliveries/{push['id']}")).json()
    assert detail["status"] == "sent"
    assert [(a["outcome"], a["http_status"]) for a in detail["attempts"]] == [("failed", 400), ("sent", 200)]
    assert "Notification content must not be null" in detail["attempts"][0]["error"]
    assert [(t["from"], t["to"]) for t in detail["transitions"]][-3:] == [
        ("failed", "queued"), ("queued", "sending"), ("sending", "sent"),
    ]  # fmt: skip
    assert len(onesignal_fake.sent_to("user-1")) == 1
    again = await pushing.client.post(f"/v1/deliveries/{push['id']}/retry", headers=pushing.auth)
    assert again.status_code == 409


async def test_a_retry_that_waited_for_the_row_is_dated_after_what_it_waited_behind(
    pushing: Service, onesignal_fake: OneSignalFake
) -> None:
    # The history is ordered by time: a change that waited for a row lock must not be dated before the change
    # whose transaction held it.
    _, push = await refused_push(pushing, onesignal_fake)
    delivery_id = uuid.UUID(push["id"])
    holding = asyncio.Event()

    async def hold_the_row() -> dt.datetime:
        async with pushing.runtime.sessions() as session, session.begin():
            await deliveries.lock_many(session, [delivery_id])
            holding.set()
            await asyncio.sleep(0.3)
            held_until = dt.datetime.now(dt.UTC)
            session.add(
                DeliveryTransition(delivery_id=delivery_id, from_status="failed", to_status="failed", at=held_until)
            )
        return held_until

    holder = asyncio.create_task(hold_the_row())
    await holding.wait()
    retried = await pushing.client.post(f"/v1/deliveries/{delivery_id}/retry", headers=pushing.auth)
    held_until = await holder
    assert retried.status_code == 202, retried.text
    [requeued] = [t for t in retried.json()["transitions"] if t["note"] == "retried by an operator"]
    assert dt.datetime.fromisoformat(requeued["at"]) >= held_until
