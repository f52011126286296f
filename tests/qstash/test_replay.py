"""A QStash signature is good for one request: a captured signed request replayed is a 401 that changes nothing,
on every signed route, while QStash's own retries (each signed anew) keep working. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import DeliveryAttempt
from tests.qstash.conftest import Stack, chat_event

EVENT = json.dumps(chat_event()).encode()


async def post_signed(stack: Stack, path: str, body: bytes, signature: str, **headers: str) -> httpx.Response:
    signed = {"Upstash-Signature": signature, "Content-Type": "application/json", **headers}
    return await stack.http.post(stack.url(path), content=body, headers=signed)


def problem(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    return body


async def test_a_captured_event_request_replayed_with_another_message_id_or_none_is_refused(stack: Stack) -> None:
    signature = stack.emulator.sign(EVENT, stack.url("/v1/events"))
    first = await post_signed(stack, "/v1/events", EVENT, signature, **{"Upstash-Message-Id": "msg_1"})
    assert first.status_code == 202, first.text

    for message_id in ("msg_2", "msg_3", None, "msg_1"):
        headers = {"Upstash-Message-Id": message_id} if message_id else {}
        replayed = await post_signed(stack, "/v1/events", EVENT, signature, **headers)
        assert replayed.status_code == 401, (message_id, replayed.text)
        assert "already used" in problem(replayed)["detail"]
    assert len(await stack.events()) == 1


async def test_qstash_retrying_a_message_signs_it_anew_and_gets_the_duplicate_answer(stack: Stack) -> None:
    url, same_message = stack.url("/v1/events"), {"Upstash-Message-Id": "msg_1"}
    first = await post_signed(stack, "/v1/events", EVENT, stack.emulator.sign(EVENT, url), **same_message)
    retry = await post_signed(stack, "/v1/events", EVENT, stack.emulator.sign(EVENT, url), **same_message)
    assert (first.status_code, retry.status_code) == (202, 200)
    assert retry.json()["duplicate"] is True
    assert retry.json()["event_id"] == first.json()["event_id"]


async def test_the_emulators_real_retries_pass_and_a_replay_of_one_of_them_does_not(stack: Stack) -> None:
    message_id = await stack.publish_event(chat_event(), **{"Upstash-Delay": "1000s"})
    burst = await stack.emulator.deliver_concurrently(message_id, 3)  # QStash redelivering: three new signatures
    await stack.emulator.drain()
    assert sorted(call.status or 0 for call in burst) == [200, 200, 202]
    [event] = await stack.events()
    deliveries = await stack.deliveries(event.id)
    assert {d.status for d in deliveries} == {"sent"}

    for delivery in deliveries:
        path = f"/v1/qstash/deliveries/{delivery.id}"
        [call] = stack.calls(path)
        assert call.status == 200
        replayed = await stack.http.post(stack.url(path), content=call.body, headers=call.headers)
        assert replayed.status_code == 401, replayed.text
        assert len(await stack.attempts(delivery.id)) == 1  # nothing attempted or recorded for the replay
    replayed_event = await stack.http.post(stack.url("/v1/events"), content=burst[0].body, headers=burst[0].headers)
    assert replayed_event.status_code == 401
    assert len(await stack.events()) == 1


async def test_the_failure_and_cron_routes_refuse_a_replayed_signature_too(stack: Stack) -> None:
    for path, body in (
        ("/v1/qstash/cron/sweep", b""),
        ("/v1/qstash/cron/retention", b""),
        ("/v1/qstash/failures", json.dumps({"status": 500, "sourceMessageId": "msg_gone", "url": "x"}).encode()),
    ):
        signature = stack.emulator.sign(body, stack.url(path))
        first = await post_signed(stack, path, body, signature)
        assert first.status_code == 200, (path, first.text)
        again = await post_signed(stack, path, body, signature)
        assert again.status_code == 401, (path, again.text)


async def test_concurrent_replays_of_one_signature_let_exactly_one_through(stack: Stack) -> None:
    signature = stack.emulator.sign(EVENT, stack.url("/v1/events"))
    responses = await asyncio.gather(
        *(post_signed(stack, "/v1/events", EVENT, signature, **{"Upstash-Message-Id": f"msg_{n}"}) for n in range(8))
    )
    assert sorted(r.status_code for r in responses) == [202] + [401] * 7
    assert len(await stack.events()) == 1


async def test_a_signature_without_a_jti_cannot_be_spent_and_is_refused(stack: Stack) -> None:
    signature = stack.emulator.sign(EVENT, stack.url("/v1/events"), jti=None)
    refused = await post_signed(stack, "/v1/events", EVENT, signature, **{"Upstash-Message-Id": "msg_no_jti"})
    assert refused.status_code == 401
    assert await stack.events() == []


async def test_a_replayed_delivery_call_leaves_no_attempt_behind(stack: Stack) -> None:
    """The replay is refused in the claim's transaction, which rolls back: no claim, no attempt row, no provider
    call."""
    await stack.publish_event(chat_event())
    await stack.emulator.drain()
    [event] = await stack.events()
    push = await stack.delivery(event.id, "user-1", "push")
    [call] = stack.calls(f"/v1/qstash/deliveries/{push.id}")
    sent_before = len(stack.onesignal.notifications)
    for _ in range(3):
        replayed = await stack.http.post(call.url, content=call.body, headers=call.headers)
        assert replayed.status_code == 401
    attempts = await stack.scalar(
        sa.select(sa.func.count()).select_from(DeliveryAttempt).where(col(DeliveryAttempt.delivery_id) == push.id)
    )
    assert attempts == 1
    assert len(stack.onesignal.notifications) == sent_before
