"""What the destination gets when QStashDispatcher publishes: signatures, retries, failure callbacks."""

from __future__ import annotations

import uuid

import pytest
from qstash import Receiver
from qstash.errors import SignatureError

from notifier.dispatch.base import DispatchItem
from tests.dispatch.conftest import MAX_RETRIES, Destination, MakeDispatcher, b64json, delivery_url
from tests.fakes.base import Fault
from tests.fakes.qstash import QStashEmulator


async def test_destination_receives_a_signature_the_sdk_receiver_accepts(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    item = DispatchItem(uuid.uuid4())
    await make_dispatcher().dispatch([item])
    await qstash_emulator.drain()
    [received] = destination.received("deliveries")
    signature, body, url = (
        received.headers["upstash-signature"],
        received.body.decode(),
        delivery_url(destination, item),
    )

    Receiver(qstash_emulator.current_key, qstash_emulator.next_key).verify(signature=signature, body=body, url=url)
    Receiver("sig_rotated_away_" + "x" * 32, qstash_emulator.current_key).verify(
        signature=signature, body=body, url=url
    )
    with pytest.raises(SignatureError):
        Receiver(qstash_emulator.current_key, qstash_emulator.next_key).verify(
            signature=signature, body=body, url=f"{destination.url}/v1/qstash/deliveries/{uuid.uuid4()}"
        )
    with pytest.raises(SignatureError):
        Receiver(qstash_emulator.current_key, qstash_emulator.next_key).verify(
            signature=signature, body=body.replace(str(item.delivery_id), str(uuid.uuid4())), url=url
        )
    with pytest.raises(SignatureError):
        Receiver("sig_a" * 8, "sig_b" * 8).verify(signature=signature, body=body, url=url)


async def test_500_then_200_is_two_attempts_of_the_same_message(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    destination.fail("deliveries", Fault.http(500))

    await make_dispatcher().dispatch([DispatchItem(uuid.uuid4())])
    await qstash_emulator.drain()

    first, second = destination.received("deliveries")
    assert (first.headers["upstash-retried"], second.headers["upstash-retried"]) == ("0", "1")
    assert first.headers["upstash-message-id"] == second.headers["upstash-message-id"]
    assert [a.status for a in qstash_emulator.deliveries_log] == [500, 200]
    assert destination.received("failures") == []


@pytest.mark.parametrize(("retry_after", "min_gap", "max_gap"), [(None, 0.0, 0.25), ("400", 0.38, 2.0)])
async def test_retry_after_steers_the_next_attempt(
    retry_after: str | None,
    min_gap: float,
    max_gap: float,
    qstash_emulator: QStashEmulator,
    destination: Destination,
    make_dispatcher: MakeDispatcher,
) -> None:
    # time_scale 0.001: default first backoff e^2.5 s -> 12 ms; Retry-After 400 s -> 0.4 s.
    headers = {"Retry-After": retry_after} if retry_after else {}
    destination.fail("deliveries", Fault(status=503, body={"error": "busy"}, headers=headers))

    await make_dispatcher().dispatch([DispatchItem(uuid.uuid4())])
    await qstash_emulator.drain()

    first, second = qstash_emulator.deliveries_log
    assert (first.status, second.status) == (503, 200)
    assert min_gap <= second.at - first.at < max_gap


async def test_non_retryable_489_stops_at_once_and_calls_the_failure_callback(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    item = DispatchItem(uuid.uuid4())
    reply = {"detail": "address rejected"}
    destination.fail("deliveries", Fault(status=489, body=reply, headers={"Upstash-NonRetryable-Error": "true"}))

    await make_dispatcher().dispatch([item])
    await qstash_emulator.drain()

    [attempt] = destination.received("deliveries")
    [callback] = destination.received("failures")
    report = callback.json()
    assert report["status"] == 489
    assert (report["retried"], report["maxRetries"]) == (0, MAX_RETRIES)
    assert report["sourceMessageId"] == attempt.headers["upstash-message-id"]
    assert report["url"] == delivery_url(destination, item)
    assert report["method"] == "POST"
    assert b64json(report["sourceBody"]) == {"delivery_id": str(item.delivery_id), "generation": 0}
    assert b64json(report["body"]) == reply
    assert report["header"]["upstash-nonretryable-error"] == ["true"]
    assert report["dlqId"] == qstash_emulator.dlq[0]["dlqId"]
    # The callback is a QStash message of its own: signed for the callback URL, with its own id.
    Receiver(qstash_emulator.current_key, qstash_emulator.next_key).verify(
        signature=callback.headers["upstash-signature"],
        body=callback.body.decode(),
        url=f"{destination.url}/v1/qstash/failures",
    )
    assert callback.headers["upstash-message-id"] != attempt.headers["upstash-message-id"]


async def test_exhausted_retries_call_the_failure_callback(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    item = DispatchItem(uuid.uuid4())
    destination.fail("deliveries", *[Fault.http(500)] * (MAX_RETRIES + 1))

    await make_dispatcher().dispatch([item])
    await qstash_emulator.drain()

    attempts = destination.received("deliveries")
    assert [a.headers["upstash-retried"] for a in attempts] == ["0", "1", "2"]
    [callback] = destination.received("failures")
    report = callback.json()
    assert (report["status"], report["retried"], report["maxRetries"]) == (500, MAX_RETRIES, MAX_RETRIES)
    assert report["sourceMessageId"] == attempts[0].headers["upstash-message-id"]
    assert b64json(report["sourceBody"]) == {"delivery_id": str(item.delivery_id), "generation": 0}
    [dead] = qstash_emulator.dlq
    assert dead["messageId"] == report["sourceMessageId"]
