"""Provider faults in QStash mode: a 429 with Retry-After, a provider that hangs, a provider that is down.

The real service runs under uvicorn in QStash mode (SQLite and PostgreSQL) and is called back by the
QStash emulator; push goes to the OneSignal fake, directly or through a per-idempotency-key fault
script in front of it (``tests/reliability/faults.py``). Whatever the provider does, the delivery
endpoint answers QStash in QStash's terms (503 + ``Retry-After``, then 200 once sent), QStash's retry
reuses the delivery's idempotency key, and the provider creates exactly one notification: the
QStash-mode counterpart of ``tests/reliability/test_provider_faults.py``.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest

from notifier.channels.base import IDEMPOTENCY_NAMESPACE
from notifier.db.models import Delivery
from notifier.delivery.retry import backoff_seconds
from tests.fakes.base import Fault, refused_url, serve
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.qstash import DeliveryAttempt as QStashCall
from tests.qstash.conftest import Stack, StackFactory, chat_event
from tests.reliability.faults import Late, first, in_front_of, onesignal_key_of
from tests.reliability.ledger import eventually

# The hang tests: notifier gives up on the provider after PROVIDER_TIMEOUT, QStash on notifier after
# QSTASH_TIMEOUT, and the provider stays silent for longer than both.
PROVIDER_TIMEOUT = 0.5
QSTASH_TIMEOUT = 2.0
HANG = 2.5
# Timers and socket timeouts may fire a hair before their nominal deadline.
CLOCK_SLACK = 0.02


def reply(call: QStashCall) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(call.response_body)
    return body


def idempotency_key(delivery_id: uuid.UUID) -> str:
    """The key every OneSignal request for this delivery must carry (derived from the delivery id)."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(delivery_id)))


def scheduled_retry_after(stack: Stack, retries_so_far: int) -> str:
    """The Retry-After notifier answers when the provider named none: its own schedule, rounded up."""
    return str(math.ceil(backoff_seconds(retries_so_far, scale=stack.settings.retry_backoff_scale)))


async def the_push(stack: Stack) -> Delivery:
    [event] = await stack.events()
    return await stack.delivery(event.id, "user-1", "push")


@pytest.mark.parametrize(
    ("provider_retry_after", "expected_retry_after"),
    [("3", 3), ("2.5", 3)],
    ids=["whole-seconds", "fraction-rounded-up"],
)
async def test_a_429_retry_after_is_passed_to_qstash_and_honoured_before_the_one_send(
    stack: Stack, provider_retry_after: str, expected_retry_after: int
) -> None:
    # Stretch the emulator's clock (1 emulated s = 0.1 real s) so the Retry-After wait is measurable;
    # notifier's own schedule would have said Retry-After: 1, i.e. a wait of only 0.1 s.
    stack.emulator.time_scale = 0.1
    assert scheduled_retry_after(stack, 1) != str(expected_retry_after)  # the provider's hint is distinguishable
    stack.onesignal.fail_next(
        Fault.http(429, {"errors": ["API rate limit exceeded"]}, **{"Retry-After": provider_retry_after})
    )

    await stack.publish_event(chat_event())
    await stack.emulator.drain(10)

    push = await the_push(stack)
    assert (push.status, push.reason, push.attempts) == ("sent", None, 2)
    calls = stack.calls(f"/v1/qstash/deliveries/{push.id}")
    assert [(c.status, c.retried) for c in calls] == [(503, 0), (200, 1)]
    rate_limited, sent = calls
    # notifier's answer asks for at least what the provider asked: ceil of the provider's seconds
    assert rate_limited.response_headers["retry-after"] == str(expected_retry_after)
    assert rate_limited.response_headers["content-type"] == "application/problem+json"
    assert reply(rate_limited)["title"] == "Retry later"
    assert reply(rate_limited)["detail"].startswith("429")
    assert reply(sent)["outcome"] == "sent"
    # QStash retried no sooner than that Retry-After (scaled); `at` is when each call was answered
    assert sent.at - rate_limited.at >= expected_retry_after * stack.emulator.time_scale - CLOCK_SLACK
    attempts = await stack.attempts(push.id)
    assert [(a.number, a.outcome, a.http_status, a.via) for a in attempts] == [
        (1, "retry", 429, "qstash"),
        (2, "sent", 200, "qstash"),
    ]
    assert attempts[0].finished_at is not None
    assert attempts[0].finished_at <= attempts[1].started_at
    # both requests carried the delivery's key; OneSignal created one notification
    assert [r.json()["idempotency_key"] for r in stack.onesignal.requests] == [idempotency_key(push.id)] * 2
    [notification] = stack.onesignal.sent_to("user-1")
    assert stack.onesignal.notifications == [notification]
    assert push.provider_message_id == notification.id
    assert stack.emulator.failure_callbacks == []


@pytest.mark.parametrize("fault", ["hang-before-accepting", "reply-lost-after-accepting"])
async def test_a_provider_hanging_past_the_timeout_gets_a_503_in_time_and_one_send_with_the_same_key(
    stack_factory: StackFactory, onesignal_fake: OneSignalFake, fault: str
) -> None:
    # hang-before-accepting: OneSignal reads the request and goes silent, creating nothing.
    # reply-lost-after-accepting: OneSignal creates the notification, then its reply is held back.
    script = first(1, Fault.hang(HANG) if fault == "hang-before-accepting" else Late(HANG))
    with in_front_of(onesignal_fake.app, onesignal_key_of, script) as (push_url, faults):
        async with stack_factory(onesignal_api_url=push_url, provider_timeout_seconds=PROVIDER_TIMEOUT) as stack:
            # QStash gives up on a call after QSTASH_TIMEOUT: shorter than the hang, longer than our bound.
            stack.emulator.attempt_timeout = QSTASH_TIMEOUT

            await stack.publish_event(chat_event())
            await stack.emulator.drain(15)

            push = await the_push(stack)
            assert (push.status, push.reason, push.attempts) == ("sent", None, 2)
            calls = stack.calls(f"/v1/qstash/deliveries/{push.id}")
            # the first call was answered (503), not cut off by QStash's timeout (status None, an error)
            assert [(c.status, c.retried, c.error) for c in calls] == [(503, 0, None), (200, 1, None)]
            assert calls[0].response_headers["retry-after"] == scheduled_retry_after(stack, 1)
            assert "timed out" in reply(calls[0])["detail"]
            attempts = await stack.attempts(push.id)
            assert [(a.number, a.outcome, a.http_status) for a in attempts] == [(1, "retry", None), (2, "sent", 200)]
            timed_out = attempts[0]
            assert timed_out.finished_at is not None
            assert "timed out" in (timed_out.error or "")
            # it did wait for the provider as long as NOTIFIER_PROVIDER_TIMEOUT_SECONDS before giving up
            waited = (timed_out.finished_at - timed_out.started_at).total_seconds()
            assert waited >= PROVIDER_TIMEOUT - CLOCK_SLACK
            # two requests, one key (the delivery's), one notification
            assert dict(faults.seen) == {idempotency_key(push.id): 2}
            [notification] = onesignal_fake.notifications
            assert notification.external_ids == ["user-1"]
            assert push.provider_message_id == notification.id
            if fault == "reply-lost-after-accepting":
                # the lost reply's request created it; the retry was answered from OneSignal's key store
                assert len(onesignal_fake.requests) == 2
            else:
                assert len(onesignal_fake.requests) == 1  # the hung request never reached OneSignal proper
            assert stack.emulator.failure_callbacks == []


async def test_a_refused_connection_is_retried_via_503_until_the_provider_is_back_then_sent_once(
    stack_factory: StackFactory, onesignal_fake: OneSignalFake
) -> None:
    down = refused_url()  # nothing listens here yet: connection refused
    # A larger budget than the fixture's, so that a slow machine may need an extra retry or two.
    async with stack_factory(onesignal_api_url=down, max_retries=5) as stack:
        # One emulated second is one real second (longer hints capped at max_wait, 2 s): notifier's
        # Retry-After: 1 leaves a second to bring OneSignal up between QStash's attempts.
        stack.emulator.time_scale = 1.0
        await stack.publish_event(chat_event())

        def a_delivery_call_was_refused() -> bool:
            return any("/v1/qstash/deliveries/" in c.url and c.status == 503 for c in stack.emulator.deliveries_log)

        await eventually(a_delivery_call_was_refused, timeout=10, interval=0.01, what="the push attempt to get a 503")
        # now OneSignal comes up on the very address notifier was refused at
        with serve(onesignal_fake.app, port=urlsplit(down).port):
            await stack.emulator.drain(20)

        push = await the_push(stack)
        assert push.status == "sent", push.last_error
        calls = stack.calls(f"/v1/qstash/deliveries/{push.id}")
        *refused, sent = calls
        assert refused, "the push was never refused"
        assert [(c.status, c.retried) for c in calls] == [(503, n) for n in range(len(refused))] + [(200, len(refused))]
        # each 503 carried notifier's own schedule (a refused connection names no Retry-After)
        assert [c.response_headers["retry-after"] for c in refused] == [
            scheduled_retry_after(stack, n) for n in range(1, len(refused) + 1)
        ]
        assert reply(sent)["outcome"] == "sent"
        attempts = await stack.attempts(push.id)
        assert [a.outcome for a in attempts] == ["retry"] * len(refused) + ["sent"]
        assert push.attempts == len(calls)
        errors = [a.error or "" for a in attempts[:-1]]
        assert all("connection failed" in e for e in errors), errors
        # refused requests never reached OneSignal: the one that did carried the delivery's key
        [request] = onesignal_fake.requests
        assert request.json()["idempotency_key"] == idempotency_key(push.id)
        [notification] = onesignal_fake.notifications
        assert push.provider_message_id == notification.id
        assert stack.emulator.failure_callbacks == []
