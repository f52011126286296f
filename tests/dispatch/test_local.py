"""The local dispatcher: replicas never double-claim, shutdown loses nothing, crashed claims are taken over."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import Counter

import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery, DeliveryAttempt
from tests.conftest import Service, make_settings, running_service
from tests.fakes.onesignal import OneSignalFake
from tests.reliability.ledger import eventually

PAYMENT = {"payment_id": "p", "amount": "10", "currency": "EUR", "payer_name": "Ann"}


def push_settings(url: str, fake: OneSignalFake, **overrides: object) -> dict[str, object]:
    return {
        "onesignal_app_id": fake.app_id,
        "onesignal_rest_api_key": fake.api_key,
        "onesignal_api_url": fake.url,
        **overrides,
    }


async def pushes(svc: Service) -> list[Delivery]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(sa.select(Delivery).where(col(Delivery.channel) == "push"))
        return list(rows.scalars())


async def attempt_rows(svc: Service, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(
            sa.select(DeliveryAttempt)
            .where(col(DeliveryAttempt.delivery_id) == delivery_id)
            .order_by(col(DeliveryAttempt.number))
        )
        return list(rows.scalars())


async def test_two_replicas_never_attempt_the_same_delivery(postgres_url: str, onesignal_fake: OneSignalFake) -> None:
    settings = make_settings(postgres_url, workers=8, **push_settings(postgres_url, onesignal_fake))
    async with running_service(settings) as first, running_service(settings) as second:
        events = [
            {"type": "payment.received", "recipients": [f"u-{i}-{j}" for j in range(3)], "data": PAYMENT}
            for i in range(40)
        ]
        responses = await asyncio.gather(
            *((first if i % 2 else second).post_event(body) for i, body in enumerate(events))
        )
        assert all(r.status_code == 202 for r in responses)
        await asyncio.gather(first.drain(30), second.drain(30))
        rows = await pushes(first)
        assert len(rows) == 120
        assert {(r.status, r.attempts) for r in rows} == {("sent", 1)}
        # Each event's three pushes went as one send group: one request each, every one creating its
        # notification (no group was sent twice, even deduped), and every user is in exactly one.
        assert len({r.send_group for r in rows}) == 40
        assert len(onesignal_fake.requests) == 40
        assert len(onesignal_fake.notifications) == 40
        notified = Counter(user for n in onesignal_fake.notifications for user in n.external_ids)
        assert notified == Counter(r.user_id for r in rows)
        assert set(notified.values()) == {1}


async def test_shutdown_releases_an_attempt_stuck_past_the_grace_period(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.latency = 3.0  # the provider accepts, but answers late
    settings = make_settings(
        database_url,
        shutdown_grace_seconds=0.2,
        provider_timeout_seconds=10,
        **push_settings(database_url, onesignal_fake),
    )
    async with running_service(settings) as svc:
        await svc.post_event({"type": "payment.received", "recipients": ["u-1"], "data": PAYMENT})
        await eventually(lambda: bool(onesignal_fake.requests), timeout=4, what="the attempt to reach the provider")
    # the app has shut down with the attempt in flight: the claim went back to the queue
    onesignal_fake.latency = 0.0
    async with running_service(settings) as svc:
        [before] = await pushes(svc)
        await svc.drain(15)
        [push] = await pushes(svc)
        attempts = await attempt_rows(svc, push.id)
    assert before.status == "queued"
    assert push.status == "sent"
    assert [a.outcome for a in attempts] == ["interrupted", "sent"]
    # the provider saw the same idempotency key twice and created one notification
    assert len({r.json()["idempotency_key"] for r in onesignal_fake.requests}) == 1
    assert len(onesignal_fake.notifications) == 1


async def test_a_claim_abandoned_by_a_crashed_worker_is_taken_over_after_its_lease(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    settings = make_settings(database_url, **push_settings(database_url, onesignal_fake))
    async with running_service(settings) as svc:
        response = await svc.post_event({"type": "payment.received", "recipients": ["u-1"], "data": PAYMENT})
        push_id = uuid.UUID(next(d["id"] for d in response.json()["deliveries"] if d["channel"] == "push"))
        await svc.drain()
        # Simulate a process that died between "provider accepted" and "recorded": the row is back in
        # `sending` with a lease that has run out and a token nobody holds.
        async with svc.runtime.sessions() as session, session.begin():
            await session.execute(
                sa.update(Delivery)
                .where(col(Delivery.id) == push_id)
                .values(
                    status="sending",
                    claim_token=uuid.uuid4(),
                    claimed_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1),
                )
            )
        await svc.drain()
        [push] = await pushes(svc)
    assert (push.status, push.attempts) == ("sent", 2)
    assert len(onesignal_fake.notifications) == 1  # the retry reused the idempotency key


@pytest.mark.parametrize("workers", [1, 4])
async def test_all_deliveries_reach_a_terminal_state(
    database_url: str, onesignal_fake: OneSignalFake, workers: int
) -> None:
    settings = make_settings(database_url, workers=workers, **push_settings(database_url, onesignal_fake))
    async with running_service(settings) as svc:
        for i in range(10):
            await svc.post_event({"type": "payment.received", "recipients": [f"u-{i}"], "data": PAYMENT})
        await svc.drain(20)
        async with svc.runtime.sessions() as session:
            statuses = (await session.execute(sa.select(Delivery.status))).scalars().all()
    assert sorted(set(statuses)) == ["sent", "suppressed"]  # email: no provider configured
    assert len(onesignal_fake.notifications) == 10


async def test_claims_still_queued_at_shutdown_go_back_and_are_sent_once_after_restart(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.latency = 3.0  # the first push is in flight when the service stops
    settings = make_settings(
        database_url,
        workers=1,  # one in flight, the rest claimed and waiting in the worker queue
        shutdown_grace_seconds=0.2,
        provider_timeout_seconds=10,
        **push_settings(database_url, onesignal_fake),
    )
    async with running_service(settings) as svc:
        for user in ("u-1", "u-2", "u-3"):  # three events: three attempts, one in flight and two queued
            await svc.post_event({"type": "payment.received", "recipients": [user], "data": PAYMENT})
        await eventually(
            lambda: bool(onesignal_fake.requests), timeout=4, what="the first attempt to reach the provider"
        )
    onesignal_fake.latency = 0.0
    async with running_service(settings) as svc:
        before = await pushes(svc)
        await svc.drain(15)
        after = await pushes(svc)
        attempts = {push.id: await attempt_rows(svc, push.id) for push in after}
    assert {p.status for p in before} == {"queued"}  # nothing left claimed or half-recorded
    assert {p.status for p in after} == {"sent"}
    for rows in attempts.values():
        # every attempt row is closed; a claim released before or during its send says so
        assert all(a.finished_at is not None for a in rows)
        assert [a.outcome for a in rows][-1] == "sent"
        assert {a.outcome for a in rows[:-1]} <= {"interrupted"}
    assert len(onesignal_fake.notifications) == 3  # one per delivery: retries reused their keys


async def test_a_lease_is_renewed_only_while_its_token_still_holds(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    settings = make_settings(database_url, **push_settings(database_url, onesignal_fake))
    async with running_service(settings) as svc:
        await svc.runtime.dispatcher.aclose()  # claim by hand below, nothing else may
        for user in ("u-1", "u-2"):  # two events: two batches, each under its own token
            await svc.post_event({"type": "payment.received", "recipients": [user], "data": PAYMENT})
        runner = svc.runtime.runner
        batches = await runner.claim_due(limit=10, lease=dt.timedelta(seconds=1))
        pushed = (b for b in batches if b.claims[0].delivery.channel == "push")
        kept, lost = sorted(pushed, key=lambda b: b.claims[0].delivery.user_id)
        async with svc.runtime.sessions() as session, session.begin():
            await session.execute(
                sa.update(Delivery).where(col(Delivery.id).in_(lost.delivery_ids)).values(claim_token=uuid.uuid4())
            )
        assert await runner.renew(kept, dt.timedelta(seconds=60))
        assert not await runner.renew(lost, dt.timedelta(seconds=60))
        rows = {p.id: p for p in await pushes(svc)}
    remaining = rows[kept.delivery_ids[0]].claimed_until - dt.datetime.now(dt.UTC)  # type: ignore[operator]
    assert remaining > dt.timedelta(seconds=50)
    assert rows[lost.delivery_ids[0]].claim_token != lost.token


async def test_an_attempt_row_spans_the_attempt_not_the_wait_in_the_queue(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.latency = 1.0
    settings = make_settings(database_url, workers=1, **push_settings(database_url, onesignal_fake))
    async with running_service(settings) as svc:
        # One worker: both pushes (two events) are claimed together, the second waits ~1 s behind the first.
        for user in ("u-1", "u-2"):
            await svc.post_event({"type": "payment.received", "recipients": [user], "data": PAYMENT})
        await svc.drain(15)
        spans = [
            (a.finished_at - a.started_at).total_seconds()  # type: ignore[operator]
            for push in await pushes(svc)
            for a in await attempt_rows(svc, push.id)
        ]
    assert len(spans) == 2
    # The provider's 1 s plus rendering; 2 s if the wait in the queue were counted. The margin is wide because
    # an overloaded machine (two suites at once beside a CPU burner) stretches the rendering and the loop too.
    assert all(1.0 <= span < 1.8 for span in spans), spans


async def test_claims_released_unsent_at_shutdown_keep_their_retry_budget(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    # No retries allowed: a claim that waited in the worker queue at shutdown was no attempt and is still sent
    # after the restart; the one cut off mid-send was an attempt, and its budget is spent.
    onesignal_fake.latency = 3.0
    settings = make_settings(
        database_url,
        workers=1,
        max_retries=0,
        shutdown_grace_seconds=0.2,
        provider_timeout_seconds=10,
        **push_settings(database_url, onesignal_fake),
    )
    async with running_service(settings) as svc:
        for user in ("u-1", "u-2"):
            await svc.post_event({"type": "payment.received", "recipients": [user], "data": PAYMENT})
        await eventually(
            lambda: bool(onesignal_fake.requests), timeout=4, what="the first attempt to reach the provider"
        )

        async def all_claimed() -> bool:  # one in flight, one waiting in the worker queue
            return {push.status for push in await pushes(svc)} == {"sending"}

        await eventually(all_claimed, timeout=4, what="the second claim")
    [in_flight] = onesignal_fake.requests[0].json()["include_aliases"]["external_id"]
    onesignal_fake.latency = 0.0
    async with running_service(settings) as svc:
        await svc.drain(15)
        after = {push.user_id: push for push in await pushes(svc)}
    assert (after[in_flight].status, after[in_flight].reason) == ("failed", "retries_exhausted")
    [waited] = [push for user, push in after.items() if user != in_flight]
    assert (waited.status, waited.attempts, waited.retry_base) == ("sent", 2, 1)
