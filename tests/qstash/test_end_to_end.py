"""QStash mode end to end: events published through the emulator, deliveries called back, retries, callbacks.

Every test runs the real service under uvicorn (SQLite and PostgreSQL) with NOTIFIER_MAX_RETRIES=2
and the emulator's compressed time (0.001); push goes to the OneSignal fake, email to a real SMTP
server, in-app to the stored inbox.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery, DeliveryAttempt, Event, InboxMessage
from notifier.dispatch.qstash import RETENTION_SCHEDULE_ID, SWEEP_SCHEDULE_ID, sync_schedules
from notifier.types import utcnow
from tests.fakes.base import Fault
from tests.qstash.conftest import MAX_RETRIES, Stack, chat_event

TWO_USERS = ({"id": "user-1", "email": "u1@example.com"}, {"id": "user-2", "email": "u2@example.com"})


def reply(call: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(call.response_body)
    return body


async def only_event_id(stack: Stack) -> uuid.UUID:
    [event] = await stack.events()
    return event.id


async def test_a_redelivered_event_message_creates_one_set_of_deliveries(stack: Stack) -> None:
    # The delay (1000 s, i.e. 1 s compressed) lets the test race duplicate first deliveries.
    message_id = await stack.publish_event(chat_event(*TWO_USERS), **{"Upstash-Delay": "1000s"})

    burst = await stack.emulator.deliver_concurrently(message_id, 4)
    await stack.emulator.drain()
    again = await stack.emulator.redeliver(message_id)
    await stack.emulator.drain()

    assert sorted(call.status or 0 for call in burst) == [200, 200, 200, 202]
    assert again.status == 200
    assert reply(again)["duplicate"] is True
    [event] = await stack.events()
    assert (event.idempotency_key, event.source, event.source_message_id) == (
        f"qstash:{message_id}",
        "qstash",
        message_id,
    )
    assert {reply(call)["event_id"] for call in [*burst, again]} == {str(event.id)}
    deliveries = await stack.deliveries(event.id)
    assert [(d.user_id, d.channel, d.status) for d in deliveries] == [
        ("user-1", "in_app", "sent"),
        ("user-1", "push", "sent"),
        ("user-2", "in_app", "sent"),
        ("user-2", "push", "sent"),
    ]
    for delivery in deliveries:
        assert [c.status for c in stack.unit_calls(delivery)] == [200]
        [attempt] = await stack.attempts(delivery.id)
        assert (attempt.number, attempt.outcome, attempt.via) == (1, "sent", "qstash")
        assert attempt.finished_at is not None
    assert stack.notified() == ["user-1", "user-2"]


async def test_provider_500_then_200_is_sent_after_two_attempts_with_one_idempotency_key(stack: Stack) -> None:
    stack.onesignal.fail_next(Fault.http(500, {"errors": ["Internal Server Error"]}))

    await stack.publish_event(chat_event())
    await stack.emulator.drain()

    push = await stack.delivery(await only_event_id(stack), "user-1", "push")
    assert (push.status, push.reason, push.attempts) == ("sent", None, 2)
    calls = stack.calls(f"/v1/qstash/deliveries/{push.id}")
    assert [(c.status, c.retried) for c in calls] == [(503, 0), (200, 1)]
    assert calls[0].response_headers["retry-after"] == "1"  # ceil(e^0 s x backoff scale 0.001)
    assert calls[0].response_headers["content-type"] == "application/problem+json"
    assert reply(calls[1])["outcome"] == "sent"
    attempts = await stack.attempts(push.id)
    assert [(a.number, a.outcome, a.http_status, a.via) for a in attempts] == [
        (1, "retry", 500, "qstash"),
        (2, "sent", 200, "qstash"),
    ]
    keys = {request.json()["idempotency_key"] for request in stack.onesignal.requests}
    assert len(stack.onesignal.requests) == 2
    assert len(keys) == 1
    [notification] = stack.onesignal.notifications
    assert push.provider_message_id == notification.id
    assert stack.emulator.failure_callbacks == []


async def test_provider_400_is_489_failed_rejected_without_a_qstash_retry(stack: Stack) -> None:
    stack.onesignal.fail_next(Fault.http(400, {"errors": ["Notification content must not be null"]}))

    await stack.publish_event(chat_event())
    await stack.emulator.drain()

    event_id = await only_event_id(stack)
    push = await stack.delivery(event_id, "user-1", "push")
    assert (push.status, push.reason, push.attempts) == ("failed", "rejected", 1)
    [call] = stack.calls(f"/v1/qstash/deliveries/{push.id}")
    assert call.status == 489
    assert call.response_headers["upstash-nonretryable-error"] == "true"
    assert reply(call)["detail"].startswith("rejected: 400")
    # QStash still reports the dead message; the row is terminal already and stays as it is.
    [callback] = stack.calls("/v1/qstash/failures")
    assert (callback.status, reply(callback)["outcome"]) == (200, "terminal")
    assert (await stack.delivery(event_id, "user-1", "push")).reason == "rejected"
    # push -> email fallback for chat.message.offline, planned and published before the 489.
    email = await stack.delivery(event_id, "user-1", "email")
    assert (email.status, email.fallback_of) == ("sent", push.id)
    [mail] = stack.smtp.envelopes
    assert mail.rcpt_tos == ["u1@example.com"]


async def test_provider_500_forever_exhausts_the_budget_and_sends_the_email_fallback(stack: Stack) -> None:
    stack.onesignal.fail_always(Fault.http(500))

    await stack.publish_event(chat_event())
    await stack.emulator.drain()

    event_id = await only_event_id(stack)
    push = await stack.delivery(event_id, "user-1", "push")
    assert (push.status, push.reason, push.attempts) == ("failed", "retries_exhausted", 1 + MAX_RETRIES)
    calls = stack.calls(f"/v1/qstash/deliveries/{push.id}")
    assert [(c.status, c.retried) for c in calls] == [(503, 0), (503, 1), (489, 2)]
    assert [a.outcome for a in await stack.attempts(push.id)] == ["retry", "retry", "retry"]
    [report] = stack.emulator.failure_callbacks
    assert (report["retried"], report["maxRetries"]) == (MAX_RETRIES, MAX_RETRIES)
    [callback] = stack.calls("/v1/qstash/failures")
    assert (callback.status, reply(callback)["status"], reply(callback)["reason"]) == (
        200,
        "failed",
        "retries_exhausted",
    )
    assert len({r.json()["idempotency_key"] for r in stack.onesignal.requests}) == 1
    assert stack.onesignal.notifications == []
    email = await stack.delivery(event_id, "user-1", "email")
    assert (email.status, email.fallback_of, email.attempts) == ("sent", push.id, 1)
    [message] = stack.smtp.messages
    assert message["To"] == "u1@example.com"
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    assert "are you there?" in text.get_content()


async def _left_queued(stack: Stack, body: dict[str, Any]) -> uuid.UUID:
    """Post an event while QStash refuses the publish: the request succeeds, the rows stay queued."""
    stack.emulator.fail_next(Fault.http(500, {"error": "QStash is having a bad day"}))
    response = await stack.post_event(body)
    assert response.status_code == 202
    event_id = uuid.UUID(response.json()["event_id"])
    assert {d.status for d in await stack.deliveries(event_id)} == {"queued"}
    return event_id


async def test_a_producer_retry_publishes_deliveries_whose_first_publish_was_lost(stack: Stack) -> None:
    body = chat_event(*TWO_USERS, idempotency_key="order-42")
    event_id = await _left_queued(stack, body)  # committed, but QStash never got the deliveries
    await stack.emulator.drain()
    assert all(stack.unit_calls(d) == [] for d in await stack.deliveries(event_id))

    again = await stack.post_event(body)
    await stack.emulator.drain()

    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["event_id"] == str(event_id)
    deliveries = await stack.deliveries(event_id)
    assert {(d.user_id, d.channel, d.status, d.attempts) for d in deliveries} == {
        (user, channel, "sent", 1) for user in ("user-1", "user-2") for channel in ("in_app", "push")
    }
    assert stack.notified() == ["user-1", "user-2"]

    # A third post, once they are sent, publishes nothing more.
    third = await stack.post_event(body)
    await stack.emulator.drain()
    assert third.status_code == 200
    for delivery in deliveries:
        assert [c.status for c in stack.unit_calls(delivery)] == [200]


@pytest.mark.parametrize(
    ("qstash_retries", "statuses", "callback_outcome"),
    [("0", [503], "failed"), ("5", [503, 503, 489], "terminal")],
    ids=["qstash-gives-up-first", "our-budget-ends-first"],
)
async def test_whichever_retry_budget_ends_first_fails_the_delivery_once(
    stack: Stack, qstash_retries: str, statuses: list[int], callback_outcome: str
) -> None:
    event_id = await _left_queued(stack, chat_event())
    push = await stack.delivery(event_id, "user-1", "push")
    stack.onesignal.fail_always(Fault.http(503))
    # QStash has given up on this delivery as often as it may (NOTIFIER_MAX_RETRIES times): once more fails it.
    await _given_up(stack, push.id, times=MAX_RETRIES)

    # A message with a retry count other than NOTIFIER_MAX_RETRIES (=2), as after a config change.
    headers = {"Upstash-Retries": qstash_retries, "Upstash-Failure-Callback": stack.url("/v1/qstash/failures")}
    await stack.publish(stack.delivery_url(push.id), {"delivery_id": str(push.id)}, **headers)
    await stack.emulator.drain()

    assert [c.status for c in stack.calls(f"/v1/qstash/deliveries/{push.id}")] == statuses
    [callback] = stack.calls("/v1/qstash/failures")
    assert (callback.status, reply(callback)["outcome"]) == (200, callback_outcome)
    push = await stack.delivery(event_id, "user-1", "push")
    assert (push.status, push.reason, push.attempts) == ("failed", "retries_exhausted", len(statuses))
    if callback_outcome == "failed":
        assert "QStash gave up" in (push.last_error or "")
    email = await stack.delivery(event_id, "user-1", "email")
    assert (email.status, email.fallback_of) == ("sent", push.id)
    assert len(stack.smtp.messages) == 1


async def test_a_redelivered_delivery_message_never_calls_the_provider_twice(stack: Stack) -> None:
    await stack.publish_event(chat_event())
    await stack.emulator.drain()
    push = await stack.delivery(await only_event_id(stack), "user-1", "push")
    [message] = [m for m in stack.emulator.messages.values() if m.destination == stack.delivery_url(push.id)]

    again = await stack.emulator.redeliver(message.id)
    burst = await stack.emulator.deliver_concurrently(message.id, 3)

    for call in [again, *burst]:
        assert (call.status, reply(call)["outcome"], reply(call)["status"]) == (200, "terminal", "sent")
    assert len(stack.onesignal.requests) == 1
    assert len(await stack.attempts(push.id)) == 1


async def test_a_duplicate_delivery_during_an_attempt_is_told_to_come_back(stack: Stack) -> None:
    stack.onesignal.latency = 1.5  # the first attempt holds the lease this long (under the 2 s provider timeout)
    await stack.publish_event(chat_event())
    # Find the push's QStash message first, so that the burst below follows the in-flight attempt at once.
    deadline = time.monotonic() + 5
    while not await stack.events():  # the emulator delivers the event to /v1/events on its own schedule
        assert time.monotonic() < deadline, "the event was never ingested"
        await asyncio.sleep(0.01)
    push = await stack.delivery(await only_event_id(stack), "user-1", "push")
    while not (
        messages := [m for m in stack.emulator.messages.values() if m.destination == stack.delivery_url(push.id)]
    ):
        assert time.monotonic() < deadline, "the push was never published"
        await asyncio.sleep(0.01)
    [message] = messages
    while not stack.onesignal.requests:  # the push attempt is now in flight
        assert time.monotonic() < deadline, "the push attempt never reached OneSignal"
        await asyncio.sleep(0.01)

    burst = await stack.emulator.deliver_concurrently(message.id, 2)
    await stack.emulator.drain()

    for call in burst:
        assert call.status == 503
        assert reply(call)["title"] == "Delivery is being attempted"
        assert 1 <= int(call.response_headers["retry-after"]) <= 60  # what is left of the 60 s lease
    push = await stack.delivery(await only_event_id(stack), "user-1", "push")
    assert (push.status, push.attempts) == ("sent", 1)
    assert len(stack.onesignal.requests) == 1


async def _given_up(stack: Stack, delivery_id: uuid.UUID, *, times: int) -> None:
    """Record that QStash gave up on the delivery's messages ``times`` times already."""
    await stack.execute(sa.update(Delivery).where(col(Delivery.id) == delivery_id).values(gave_up_count=times))


async def test_qstash_giving_up_on_a_pending_delivery_is_noted_and_the_sweep_sends_a_new_generation(
    stack: Stack,
) -> None:
    event_id = await _left_queued(stack, chat_event())
    push = await stack.delivery(event_id, "user-1", "push")

    # QStash gave up on the delivery's generation-0 message (its calls never got through, say).
    noted = await stack.signed_post(
        "/v1/qstash/failures", _callback(url=stack.delivery_url(push.id), source={"generation": 0})
    )

    assert (noted.status_code, noted.json()["outcome"]) == (200, "noted")
    row = await stack.delivery(event_id, "user-1", "push")
    assert (row.status, row.gave_up_generation, row.gave_up_count) == ("queued", 0, 1)
    await sync_schedules(stack.settings)
    await stack.emulator.fire_schedule(SWEEP_SCHEDULE_ID)
    await stack.emulator.drain()
    [run] = stack.calls("/v1/qstash/cron/sweep")
    assert reply(run)["published"] == 1  # not within the grace, yet found: nothing else would call it back
    row = await stack.delivery(event_id, "user-1", "push")
    assert (row.status, row.dispatch_generation, row.gave_up_generation) == ("sent", 1, None)
    generations = [m.headers.get("upstash-deduplication-id") for m in stack.emulator.messages.values()]
    assert f"{push.id}.1" in generations
    assert stack.notified() == ["user-1"]


def _callback(*, url: str | None, source: Any = None) -> bytes:
    report: dict[str, Any] = {"status": 500, "retried": 2, "maxRetries": 2, "sourceMessageId": "msg_x", "dlqId": "1-0"}
    if url is not None:
        report["url"] = url
    if source is not None:
        report["sourceBody"] = base64.b64encode(json.dumps(source).encode()).decode()
    return json.dumps(report).encode()


async def test_failure_callbacks_find_their_delivery_and_ignore_what_they_cannot_read(stack: Stack) -> None:
    event_id = await _left_queued(stack, chat_event(*TWO_USERS))
    first = await stack.delivery(event_id, "user-1", "push")
    second = await stack.delivery(event_id, "user-2", "push")
    for push in (first, second):  # QStash gave up on them as often as it may: the callbacks fail them
        await _given_up(stack, push.id, times=MAX_RETRIES)

    by_url = await stack.signed_post("/v1/qstash/failures", _callback(url=stack.delivery_url(first.id)))
    # the fallback was published before the answer (nothing runs after a response in QStash mode)
    published_before_answer = {m.destination for m in stack.emulator.messages.values()}
    by_body = await stack.signed_post(
        "/v1/qstash/failures", _callback(url=None, source={"delivery_id": str(second.id)})
    )
    repeat = await stack.signed_post("/v1/qstash/failures", _callback(url=stack.delivery_url(first.id)))
    unknown = await stack.signed_post("/v1/qstash/failures", _callback(url=stack.delivery_url(uuid.uuid4())))
    unrelated = await stack.signed_post("/v1/qstash/failures", _callback(url=stack.url("/v1/events")))
    garbage = await stack.signed_post("/v1/qstash/failures", b"\xff not json")
    await stack.emulator.drain()

    assert [(r.status_code, r.json()["outcome"]) for r in (by_url, by_body, repeat, unknown, unrelated, garbage)] == [
        (200, "failed"),
        (200, "failed"),
        (200, "terminal"),
        (200, "missing"),
        (200, "ignored"),
        (200, "ignored"),
    ]
    for user in ("user-1", "user-2"):
        push = await stack.delivery(event_id, user, "push")
        assert (push.status, push.reason, push.attempts) == ("failed", "retries_exhausted", 0)
        email = await stack.delivery(event_id, user, "email")
        assert (email.status, email.fallback_of) == ("sent", push.id)
    first_email = await stack.delivery(event_id, "user-1", "email")
    assert by_url.json()["follow_up"] == [str(first_email.id)]
    assert stack.delivery_url(first_email.id) in published_before_answer
    assert repeat.json()["follow_up"] == []
    assert sorted(e.rcpt_tos[0] for e in stack.smtp.envelopes) == ["u1@example.com", "u2@example.com"]
    assert [t.to_status for t in await stack.transitions(first.id)] == ["queued", "failed"]
    assert second.id != first.id


async def test_a_failure_callback_during_a_live_attempt_is_recorded_not_refused(stack: Stack) -> None:
    event_id = await _left_queued(stack, chat_event())
    push = await stack.delivery(event_id, "user-1", "push")
    lease_end = utcnow() + dt.timedelta(seconds=30)
    await stack.execute(
        sa.update(Delivery).where(col(Delivery.id) == push.id).values(status="sending", claimed_until=lease_end)
    )

    response = await stack.signed_post("/v1/qstash/failures", _callback(url=stack.delivery_url(push.id)))

    # Answered at once (QStash would only repeat a refused callback); the attempt keeps the row, and QStash's
    # giving up on generation 0 is on the row for the sweep.
    assert response.status_code == 200
    assert response.json()["outcome"] == "noted"
    row = await stack.delivery(event_id, "user-1", "push")
    assert (row.status, row.dispatch_generation, row.gave_up_generation) == ("sending", 0, 0)


async def test_the_sweep_redispatches_rows_left_behind_and_leaves_fresh_ones(stack: Stack) -> None:
    stuck_event = await _left_queued(stack, chat_event(conversation="c-stuck"))
    fresh_event = await _left_queued(stack, chat_event({"id": "user-2", "email": "u2@example.com"}))
    long_ago = utcnow() - dt.timedelta(minutes=5)
    await stack.execute(sa.update(Delivery).where(col(Delivery.event_id) == stuck_event).values(updated_at=long_ago))
    # A crashed attempt: still "sending", its lease ran out a minute ago, its attempt row never finished.
    crashed = await stack.delivery(stuck_event, "user-1", "in_app")
    await stack.execute(
        sa.update(Delivery)
        .where(col(Delivery.id) == crashed.id)
        .values(status="sending", attempts=1, claimed_until=utcnow() - dt.timedelta(minutes=1))
    )
    await stack.execute(
        sa.insert(DeliveryAttempt).values(
            id=uuid.uuid4(), delivery_id=crashed.id, number=1, started_at=long_ago, via="qstash"
        )
    )

    await sync_schedules(stack.settings)
    await stack.emulator.fire_schedule(SWEEP_SCHEDULE_ID)
    await stack.emulator.drain()

    [run] = stack.calls("/v1/qstash/cron/sweep")
    assert run.status == 200
    expected = {"found": 2, "messages": 2, "published": 2, "queued": 1, "deferred": 0, "sending": 1, "more": False}
    assert reply(run) == expected
    push = await stack.delivery(stuck_event, "user-1", "push")
    assert (push.status, push.attempts) == ("sent", 1)
    in_app = await stack.delivery(stuck_event, "user-1", "in_app")
    assert (in_app.status, in_app.attempts) == ("sent", 2)
    assert [a.outcome for a in await stack.attempts(crashed.id)] == ["interrupted", "sent"]
    assert {d.status for d in await stack.deliveries(fresh_event)} == {"queued"}
    assert [n.external_ids for n in stack.onesignal.notifications] == [["user-1"]]


async def test_retention_deletes_old_rows_only(stack: Stack) -> None:
    for conversation in ("c-old", "c-old-pending", "c-new"):
        assert (await stack.post_event(chat_event(conversation=conversation))).status_code == 202
    await stack.emulator.drain()
    old, old_pending, new = [e.id for e in await stack.events()]
    ancient = utcnow() - dt.timedelta(days=stack.settings.retention_days + 1)
    await stack.execute(sa.update(Event).where(col(Event.id).in_([old, old_pending])).values(received_at=ancient))
    # old_pending still has a delivery waiting (a quiet-hours email, say): the event must stay.
    pending = await stack.delivery(old_pending, "user-1", "push")
    await stack.execute(
        sa.update(Delivery)
        .where(col(Delivery.id) == pending.id)
        .values(status="deferred", not_before=utcnow() + dt.timedelta(hours=8))
    )
    inbox = {row.event_id: row.id for row in await stack.inbox()}
    await stack.execute(  # old and read: goes
        sa.update(InboxMessage).where(col(InboxMessage.id) == inbox[old]).values(created_at=ancient, read_at=ancient)
    )
    await stack.execute(  # old but unread: stays
        sa.update(InboxMessage).where(col(InboxMessage.id) == inbox[old_pending]).values(created_at=ancient)
    )
    await stack.execute(  # read but recent: stays
        sa.update(InboxMessage).where(col(InboxMessage.id) == inbox[new]).values(read_at=utcnow())
    )
    old_deliveries = [d.id for d in await stack.deliveries(old)]

    await sync_schedules(stack.settings)
    await stack.emulator.fire_schedule(RETENTION_SCHEDULE_ID)
    await stack.emulator.drain()

    [run] = stack.calls("/v1/qstash/cron/retention")
    assert run.status == 200
    counts = {k: v for k, v in reply(run).items() if k != "cutoff"}
    assert counts == {
        "events_deleted": 1,
        "deliveries_deleted": 2,
        "inbox_messages_deleted": 1,
        "preference_changes_deleted": 0,
        "more": False,
    }
    assert [e.id for e in await stack.events()] == [old_pending, new]
    assert await stack.deliveries(old) == []
    for delivery_id in old_deliveries:
        assert await stack.attempts(delivery_id) == []
        assert await stack.transitions(delivery_id) == []
    assert sorted(str(row.event_id) for row in await stack.inbox()) == sorted([str(old_pending), str(new)])
