"""Attempting deliveries end to end: POST /v1/events → local dispatcher → real SDKs → loopback fakes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition
from notifier.delivery.messages import Batch
from notifier.delivery.retry import backoff_seconds
from tests.conftest import Service, booking_event, make_settings, running_service
from tests.db_faults import dsn_of
from tests.fakes.base import Fault
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake

CHAT = {"conversation_id": "c-1", "sender_name": "Ann", "preview": "Are you there?"}


@pytest.fixture
def with_providers(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]],
    onesignal_fake: OneSignalFake,
    knock_fake: KnockFake,
) -> Callable[..., contextlib.AbstractAsyncContextManager[Service]]:
    """The app with push (OneSignal fake) and email (Knock fake) live."""

    def factory(**overrides: Any) -> contextlib.AbstractAsyncContextManager[Service]:
        return service_factory(
            onesignal_app_id=onesignal_fake.app_id,
            onesignal_rest_api_key=onesignal_fake.api_key,
            onesignal_api_url=onesignal_fake.url,
            knock_api_key=knock_fake.api_key,
            knock_base_url=knock_fake.url,
            **overrides,
        )

    return factory


async def deliveries_of(svc: Service, event_id: str) -> dict[tuple[str, str], Delivery]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(sa.select(Delivery).where(col(Delivery.event_id) == uuid.UUID(event_id)))
        return {(d.user_id, d.channel): d for d in rows.scalars()}


async def attempts_of(svc: Service, delivery_id: Any) -> list[DeliveryAttempt]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(
            sa.select(DeliveryAttempt)
            .where(col(DeliveryAttempt.delivery_id) == delivery_id)
            .order_by(col(DeliveryAttempt.number))
        )
        return list(rows.scalars())


async def transitions_of(svc: Service, delivery_id: Any) -> list[tuple[str | None, str]]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(
            sa.select(DeliveryTransition)
            .where(col(DeliveryTransition.delivery_id) == delivery_id)
            .order_by(col(DeliveryTransition.at), col(DeliveryTransition.id))
        )
        return [(t.from_status, t.to_status) for t in rows.scalars()]


@contextlib.asynccontextmanager
async def posted(svc: Service, body: dict[str, Any]) -> AsyncIterator[str]:
    response = await svc.post_event(body)
    assert response.status_code == 202, response.text
    yield response.json()["event_id"]


async def test_transient_failures_are_retried_with_the_same_idempotency_key(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.fail_next(Fault.http(500), Fault.http(503))
    async with with_providers() as svc:
        async with posted(
            svc,
            {
                "type": "payment.received",
                "recipients": ["u-1"],
                "data": {"payment_id": "p", "amount": "10", "currency": "EUR", "payer_name": "Ann"},
            },
        ) as event_id:
            await svc.drain()
        push = (await deliveries_of(svc, event_id))[("u-1", "push")]
        assert (push.status, push.attempts) == ("sent", 3)
        attempts = await attempts_of(svc, push.id)
        assert [(a.outcome, a.http_status) for a in attempts] == [("retry", 500), ("retry", 503), ("sent", 200)]
        assert all(a.finished_at is not None for a in attempts)
        keys = {r.json()["idempotency_key"] for r in onesignal_fake.requests}
        assert len(onesignal_fake.requests) == 3
        assert len(keys) == 1
        assert len(onesignal_fake.sent_to("u-1")) == 1
        assert await transitions_of(svc, push.id) == [
            (None, "queued"),
            ("queued", "sending"),
            ("sending", "queued"),
            ("queued", "sending"),
            ("sending", "queued"),
            ("queued", "sending"),
            ("sending", "sent"),
        ]


async def test_permanent_refusal_fails_at_once(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.fail_next(Fault.http(400, {"errors": ["Invalid app_id"]}))
    async with with_providers() as svc:
        async with posted(
            svc,
            {
                "type": "payment.received",
                "recipients": ["u-1"],
                "data": {"payment_id": "p", "amount": "1", "currency": "EUR", "payer_name": "A"},
            },
        ) as event_id:
            await svc.drain()
        push = (await deliveries_of(svc, event_id))[("u-1", "push")]
        assert (push.status, push.reason, push.attempts) == ("failed", "rejected", 1)
        assert "Invalid app_id" in (push.last_error or "")


async def test_exhausted_chat_push_falls_back_to_email(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake, knock_fake: KnockFake
) -> None:
    onesignal_fake.fail_always(Fault.http(500))
    async with with_providers(max_retries=2) as svc:
        async with posted(
            svc,
            {"type": "chat.message.offline", "recipients": [{"id": "u-1", "email": "u1@example.com"}], "data": CHAT},
        ) as event_id:
            await svc.drain()
        deliveries = await deliveries_of(svc, event_id)
        push, email = deliveries[("u-1", "push")], deliveries[("u-1", "email")]
        assert (push.status, push.reason, push.attempts) == ("failed", "retries_exhausted", 3)
        assert (email.status, email.fallback_of) == ("sent", push.id)
        [trigger] = knock_fake.triggers
        assert trigger.workflow == "chat-message-offline"


async def test_unsubscribed_push_fails_not_subscribed_and_falls_back(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake, knock_fake: KnockFake
) -> None:
    onesignal_fake.unsubscribe("u-1")
    async with with_providers() as svc:
        async with posted(
            svc,
            {"type": "chat.message.offline", "recipients": [{"id": "u-1", "email": "u1@example.com"}], "data": CHAT},
        ) as event_id:
            await svc.drain()
        deliveries = await deliveries_of(svc, event_id)
        assert (deliveries[("u-1", "push")].status, deliveries[("u-1", "push")].reason) == ("failed", "not_subscribed")
        assert deliveries[("u-1", "email")].status == "sent"
        assert len(knock_fake.triggers) == 1


async def test_chat_messages_inside_the_window_become_one_digest_push(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake
) -> None:
    async with with_providers(chat_digest_seconds=1) as svc:
        event_ids = []
        for preview in ("one", "two", "three"):
            async with posted(
                svc, {"type": "chat.message.offline", "recipients": ["u-1"], "data": {**CHAT, "preview": preview}}
            ) as event_id:
                event_ids.append(event_id)
        await svc.drain(15)
        pushes = [(await deliveries_of(svc, e))[("u-1", "push")] for e in event_ids]
        assert [(p.status, p.reason) for p in pushes] == [
            ("sent", None),
            ("suppressed", "digested"),
            ("suppressed", "digested"),
        ]
        [notification] = onesignal_fake.notifications
        assert notification.body["contents"]["en"] == "3 new messages from Ann"
        inbox = (await svc.get("/v1/users/u-1/inbox")).json()
        assert sorted(i["body"] for i in inbox["data"]) == ["one", "three", "two"]


async def test_digest_counts_are_per_conversation_and_start_again_after_a_digest_is_sent(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake
) -> None:
    async def chat(svc: Any, conversation: str, count: int) -> None:
        for n in range(count):
            data = {**CHAT, "conversation_id": conversation, "preview": f"{conversation}-{n}"}
            async with posted(svc, {"type": "chat.message.offline", "recipients": ["u-1"], "data": data}):
                pass

    async with with_providers(chat_digest_seconds=1) as svc:
        # Two conversations' heads come due together, so one claim counts both digests.
        await chat(svc, "c-a", 3)
        await chat(svc, "c-b", 2)
        await svc.drain(15)
        first = sorted(n.body["contents"]["en"] for n in onesignal_fake.notifications)
        assert first == ["2 new messages from Ann", "3 new messages from Ann"]
        # A new head for c-a: the messages folded into its sent digest are not counted again.
        await chat(svc, "c-a", 2)
        await svc.drain(15)
        assert onesignal_fake.notifications[-1].body["contents"]["en"] == "2 new messages from Ann"
        assert len(onesignal_fake.notifications) == 3


async def claim_pushes(svc: Service) -> list[Batch]:
    """Claim what is due (the dispatcher is closed: nothing else claims) and return the push batches."""
    runner = svc.runtime.runner
    return [b for b in await runner.claim_due(limit=10, lease=runner.lease) if b.claims[0].delivery.channel == "push"]


async def hold(svc: Service, delivery_id: Any, not_before: Any) -> None:
    async with svc.runtime.sessions() as session, session.begin():
        await session.execute(sa.update(Delivery).where(col(Delivery.id) == delivery_id).values(not_before=not_before))


async def chat_push(svc: Service, key: str) -> dict[str, Any]:
    """Post a chat message for u-1 in c-1 and return its push delivery as the API shows it."""
    response = await svc.post_event({"type": "chat.message.offline", "recipients": ["u-1"], "data": CHAT,
                                     "idempotency_key": key})  # fmt: skip
    assert response.status_code == 202, response.text
    [push] = [d for d in response.json()["deliveries"] if d["channel"] == "push"]
    return push  # type: ignore[no-any-return]


# chat_digest_seconds=0 (the tests' default): a head is due at once, but later messages still fold into it while
# it is open. The dispatcher is closed, so these tests claim and complete the heads themselves, in a chosen order.


async def retried_beside_a_newer_head(svc: Service, onesignal_fake: OneSignalFake) -> Batch:
    """Head H1 claimed; a message arriving meanwhile starts head H2; H1's attempt fails for now (503), so both
    are open. Returns H1's batch (the dispatcher is closed: the caller claims and completes by hand)."""
    await svc.runtime.dispatcher.aclose()
    await chat_push(svc, "m1")  # head H1
    [h1] = await claim_pushes(svc)
    assert (await chat_push(svc, "m2"))["reason"] is None  # H1 is sending: a new head, H2
    onesignal_fake.fail_next(Fault.http(503, {"errors": ["busy"]}))
    assert [report.kind for report in await svc.runtime.runner.complete(h1)] == ["retry"]
    return h1


async def test_a_folded_message_is_counted_by_one_digest_when_two_heads_are_open(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake
) -> None:
    async with with_providers() as svc:
        h1 = await retried_beside_a_newer_head(svc, onesignal_fake)
        assert (await chat_push(svc, "m3"))["reason"] == "digested"
        await hold(svc, h1.claims[0].delivery.id, None)
        heads = await claim_pushes(svc)
    assert len(heads) == 2
    assert sum(b.claims[0].digest_count for b in heads) == 3


async def test_a_message_folded_into_a_retrying_head_after_a_later_head_was_sent_is_counted(
    with_providers: Callable[..., Any], onesignal_fake: OneSignalFake
) -> None:
    async with with_providers() as svc:
        h1 = await retried_beside_a_newer_head(svc, onesignal_fake)
        await hold(svc, h1.claims[0].delivery.id, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        [h2] = await claim_pushes(svc)
        assert [r.kind for r in await svc.runtime.runner.complete(h2)] == ["sent"]
        # H1, created before the sent H2, is the only open head: m3 is folded into it, and H1 must count it.
        assert (await chat_push(svc, "m3"))["reason"] == "digested"
        await hold(svc, h1.claims[0].delivery.id, None)
        [again] = await claim_pushes(svc)
    assert again.claims[0].delivery.id == h1.claims[0].delivery.id
    assert (h2.claims[0].digest_count, again.claims[0].digest_count) == (1, 2)


async def test_a_message_folded_into_a_head_counts_whatever_the_clocks_say(
    with_providers: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from notifier.ingest import events

    async with with_providers() as svc:
        await svc.runtime.dispatcher.aclose()
        head = await chat_push(svc, "m1")
        # A replica whose clock is behind (or an event whose transaction started before the head's committed)
        # stamps its fold earlier than the head it is folded into.
        earlier = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
        monkeypatch.setattr(events, "utcnow", lambda: earlier)
        assert (await chat_push(svc, "m2"))["reason"] == "digested"
        [claimed] = await claim_pushes(svc)
    assert str(claimed.claims[0].delivery.id) == head["id"]
    assert claimed.claims[0].digest_count == 2


async def test_send_at_defers_until_due(with_providers: Callable[..., Any], onesignal_fake: OneSignalFake) -> None:
    send_at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat()
    async with with_providers() as svc:
        response = await svc.post_event(
            {
                "type": "reservation.checkin_reminder",
                "recipients": ["u-1"],
                "send_at": send_at,
                "data": {"reservation_id": "r", "property": "Sea", "check_in": "today"},
            }
        )
        push = next(d for d in response.json()["deliveries"] if d["channel"] == "push")
        assert push["status"] == "deferred"
        assert onesignal_fake.notifications == []
        await svc.drain(15)
        assert len(onesignal_fake.sent_to("u-1")) == 1


async def test_email_without_address_is_suppressed(with_providers: Callable[..., Any], knock_fake: KnockFake) -> None:
    async with with_providers() as svc, posted(svc, booking_event(recipients=["no-email"])) as event_id:
        await svc.drain()
        email = (await deliveries_of(svc, event_id))[("no-email", "email")]
        assert (email.status, email.reason) == ("suppressed", "no_address")
        assert knock_fake.triggers == []


def test_backoff_follows_qstash_schedule_and_honours_retry_after() -> None:
    assert [round(backoff_seconds(n)) for n in range(1, 5)] == [12, 148, 1808, 22026]
    assert backoff_seconds(10) == 86400
    assert backoff_seconds(2, scale=0.001) == pytest.approx(0.148, rel=0.01)
    assert backoff_seconds(3, retry_after=7) == 7


async def test_a_late_group_message_is_superseded_even_when_its_first_member_was_sent(service: Service) -> None:
    # Member A was sent; member B was re-dispatched (generation 1). A late message of generation 0 must not
    # attempt B: only the pending members' generations tell whether a newer message exists.
    await service.runtime.dispatcher.aclose()  # attempts are made by hand below
    assert (await service.post_event(booking_event(recipients=["user-1", "user-2"]))).status_code == 202
    async with service.runtime.sessions() as session:
        rows = (await session.execute(sa.select(Delivery).where(col(Delivery.channel) == "in_app"))).scalars()
        first, second = sorted(rows, key=lambda d: d.id)  # the order the group's rows are locked in
    assert first.send_group is not None
    assert second.send_group == first.send_group
    async with service.runtime.sessions() as session, session.begin():
        await session.execute(sa.update(Delivery).where(col(Delivery.id) == first.id).values(status="sent"))
        await session.execute(sa.update(Delivery).where(col(Delivery.id) == second.id).values(dispatch_generation=1))
    late = await service.runtime.runner.attempt_group(first.send_group, via="qstash", generation=0)
    current = await service.runtime.runner.attempt_group(first.send_group, via="qstash", generation=1)
    async with service.runtime.sessions() as session:
        after = await session.get(Delivery, second.id)
    assert {r.kind for r in late} == {"superseded"}
    assert [(r.kind, r.delivery_id) for r in current] == [("sent", second.id)]
    assert after is not None
    assert (after.status, after.attempts) == ("sent", 1)


@pytest.mark.postgres_only
async def test_a_message_folded_while_its_head_is_claimed_is_still_counted(
    postgres_url: str, onesignal_fake: OneSignalFake
) -> None:
    # The fold's insert is slowed (a trigger) so that a claim runs between ingest reading the open head and the
    # fold committing: the claim must not take the head and count its folds before the fold is in.
    async with running_service(make_settings(postgres_url, **onesignal_fake.settings())) as svc:
        await svc.runtime.dispatcher.aclose()
        await chat_push(svc, "m1")  # head H
        conn = await asyncpg.connect(dsn_of(postgres_url))
        try:
            await conn.execute(
                """
                CREATE FUNCTION slow_fold() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$
                LANGUAGE plpgsql;
                CREATE TRIGGER slow_fold BEFORE INSERT ON deliveries FOR EACH ROW
                WHEN (NEW.reason = 'digested') EXECUTE FUNCTION slow_fold();
                """
            )
            folding = asyncio.create_task(chat_push(svc, "m2"))
            await asyncio.sleep(0.4)  # ingest has read the open head and waits in the fold's insert
            heads = await claim_pushes(svc)
            assert (await folding)["reason"] == "digested"
            heads += await claim_pushes(svc)
        finally:
            await conn.execute("DROP TRIGGER IF EXISTS slow_fold ON deliveries; DROP FUNCTION IF EXISTS slow_fold()")
            await conn.close()
    assert [b.claims[0].digest_count for b in heads] == [2]
