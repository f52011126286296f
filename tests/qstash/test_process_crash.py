"""``notifier serve`` in QStash mode SIGKILLed between the provider's accept and our commit, then restarted.

The QStash-mode counterpart of ``tests/reliability/test_process_crash.py``. The service runs as a real
process on PostgreSQL, called back by the QStash emulator; OneSignal creates the push at once but holds
its reply back, and the process is killed while the delivery call waits for it. The row is left
``sending`` under the dead process's lease with its attempt open, and the push exists at OneSignal.
Nothing but QStash's retries of that message brings the delivery to an end: while the lease is held
the restarted service answers 503 + ``Retry-After`` (the lease's remaining seconds, rounded up) and
touches nothing; once the lease has passed it takes the claim over, closes the dead attempt as
``interrupted`` and asks OneSignal again with the same idempotency key, which replays its first reply.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from notifier.db.models import Delivery
from tests.fakes.base import free_port
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.qstash import DeliveryAttempt as QStashCall
from tests.fakes.qstash import QStashEmulator
from tests.reliability.ledger import (
    Providers,
    all_terminal,
    assert_exactly_once,
    eventually,
    onesignal_key,
    payment_event,
    read_record,
    requests_per_key,
)
from tests.reliability.test_process_crash import notifier_serve, service_env, wait_ready

pytestmark = pytest.mark.postgres_only

# The dead process's lease: long enough that the restarted service is up and called back (QStash's
# backoff is capped at MAX_WAIT) while it is still held, short enough to keep the test quick.
LEASE = 6
MAX_WAIT = 2.0
MAX_RETRIES = 10  # QStash's budget: refused calls while the process is down and 503s both spend it
PROVIDER_STALL = 3.0  # OneSignal's reply is held back this long; the kill comes well before
CLOCK_SLACK = 0.05


def qstash_env(
    database_url: str, providers: Providers, emulator: QStashEmulator, url: str, lease: float
) -> dict[str, str]:
    return service_env(
        database_url,
        providers,
        NOTIFIER_DISPATCHER="qstash",
        NOTIFIER_PUBLIC_URL=url,
        NOTIFIER_MAX_RETRIES=str(MAX_RETRIES),
        NOTIFIER_CLAIM_LEASE_SECONDS=str(lease),
        QSTASH_TOKEN=emulator.token,
        QSTASH_URL=emulator.url,
        QSTASH_CURRENT_SIGNING_KEY=emulator.current_key,
        QSTASH_NEXT_SIGNING_KEY=emulator.next_key,
    )


def wall_time(call: QStashCall) -> dt.datetime:
    """When the emulator had ``call``'s answer, on the database's (wall) clock."""
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=time.monotonic() - call.at)


async def test_sigkill_after_the_providers_accept_is_finished_by_qstash_redelivery_after_the_lease(
    postgres_url: str, qstash_emulator: QStashEmulator, onesignal_fake: OneSignalFake, tmp_path: Path
) -> None:
    emulator = qstash_emulator
    # One emulated second is one real second: notifier's Retry-After is measured against a real lease.
    emulator.time_scale, emulator.max_wait = 1.0, MAX_WAIT
    providers = Providers(onesignal=onesignal_fake)
    port, log = free_port(), tmp_path / "notifier.log"
    url = f"http://127.0.0.1:{port}"
    body = payment_event("crash-qstash", "u-1")

    def calls_to(path: str) -> list[QStashCall]:
        return emulator.attempts(url=f"{url}{path}")

    onesignal_fake.latency = PROVIDER_STALL  # OneSignal creates the push at once, then sits on its reply
    with notifier_serve(qstash_env(postgres_url, providers, emulator, url, LEASE), port, log) as first:
        await wait_ready(url, first, log)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            published = await http.post(
                f"{emulator.url}/v2/publish/{url}/v1/events",
                json=body,
                headers={"Authorization": f"Bearer {emulator.token}"},
            )
            published.raise_for_status()

        def push_created_and_event_answered() -> bool:
            answered = any(c.status == 202 for c in calls_to("/v1/events"))
            return answered and onesignal_fake.in_flight > 0 and len(onesignal_fake.notifications) == 1

        await eventually(
            push_created_and_event_answered, timeout=15, interval=0.01, what="OneSignal to create the push"
        )
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
    onesignal_fake.latency = 0.0

    # The dead process left the push sending, its attempt open, its lease running; OneSignal has it.
    crashed = await read_record(postgres_url)
    [push] = crashed.of("push")
    [created] = onesignal_fake.notifications
    assert created.body["idempotency_key"] == onesignal_key(push.id)
    assert (push.status, push.attempts) == ("sending", 1)
    assert [(a.number, a.finished_at) for a in crashed.attempts_of(push.id)] == [(1, None)]
    lease_end = push.claimed_until
    assert lease_end is not None
    assert lease_end > dt.datetime.now(dt.UTC)
    push_path = f"/v1/qstash/deliveries/{push.id}"

    with notifier_serve(qstash_env(postgres_url, providers, emulator, url, 1), port, log) as second:
        await wait_ready(url, second, log)
        assert dt.datetime.now(dt.UTC) < lease_end - dt.timedelta(seconds=MAX_WAIT), (
            "the restart took so long that the lease ran out before QStash could call again: raise LEASE"
        )
        await emulator.drain(LEASE + 15)
        await eventually(lambda: all_terminal(postgres_url), timeout=5, what="every delivery to be terminal")

    # QStash's story of the push's one message: the call the kill cut off, calls refused while no process
    # listened, 503s while the lease was held, then 200 once it had passed. One message, retried in order.
    calls = calls_to(push_path)
    assert [c.retried for c in calls] == list(range(len(calls)))
    assert len({c.message_id for c in calls}) == 1
    killed, *between, done = calls
    assert killed.status is None, killed.status
    assert killed.error, "the cut-off call has no transport error"
    refused = [c for c in between if c.status is None]
    busy = [c for c in between if c.status is not None]
    assert between == refused + busy, [(c.status, c.error) for c in between]
    assert busy, "QStash never called back while the lease was held"
    for call in busy:
        # Retryable for QStash: 503 (never 489 or 2xx), told to come back when the lease has run out.
        assert call.status == 503
        assert "upstash-nonretryable-error" not in call.response_headers
        assert call.response_headers["content-type"] == "application/problem+json"
        problem = json.loads(call.response_body)
        assert (problem["title"], problem["detail"]) == (
            "Delivery is being attempted",
            "another attempt holds this delivery",
        )
        remaining = (lease_end - wall_time(call)).total_seconds()  # when the emulator had the answer
        assert remaining > -CLOCK_SLACK
        retry_after = int(call.response_headers["retry-after"])
        assert remaining - CLOCK_SLACK <= retry_after <= math.ceil(remaining) + 1, (retry_after, remaining)
    assert done.status == 200
    assert json.loads(done.response_body)["outcome"] == "sent"
    assert wall_time(done) >= lease_end
    [message] = [m for m in emulator.messages.values() if m.destination == f"{url}{push_path}"]
    assert (message.state, message.retried) == ("DELIVERED", len(calls) - 1)
    assert emulator.failure_callbacks == []
    assert emulator.dlq == []

    # The database: sent, on the second attempt (503s never claim), the dead attempt closed as interrupted,
    # the takeover no earlier than the lease's end; nothing left sending.
    record = await read_record(postgres_url)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))
    sent: Delivery = record.by_id[push.id]
    assert (sent.status, sent.attempts, sent.claim_token, sent.claimed_until) == ("sent", 2, None, None)
    interrupted, retried = record.attempts_of(push.id)
    assert (interrupted.outcome, retried.outcome, retried.http_status) == ("interrupted", "sent", 200)
    assert retried.started_at >= lease_end
    assert not [d.id for d in record.deliveries if d.status == "sending"]

    # OneSignal: asked twice with the delivery's key, created once; the recorded id is the one it created.
    assert requests_per_key(onesignal_fake) == {onesignal_key(push.id): 2}
    assert onesignal_fake.notifications == [created]
    assert sent.provider_message_id == created.id

    # And the event was taken once, before the kill, by QStash's one call.
    assert [(e.idempotency_key, e.source) for e in record.events] == [("crash-qstash", "qstash")]
    assert [c.status for c in calls_to("/v1/events")] == [202]
