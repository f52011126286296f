"""Database faults in QStash mode: PostgreSQL backends killed while QStash posts events and calls deliveries back.

The QStash-mode counterpart of ``tests/reliability/test_database_faults.py``. A producer publishes
events through the QStash emulator; the service (QStash mode, under uvicorn) stores them and
publishes one message per delivery, which the emulator calls back at ``/v1/qstash/deliveries/{id}``.
Meanwhile every backend of the service's database is terminated every 0.3 s. There is no local
dispatcher and the sweep never runs, so whatever a kill cut off is recovered only by QStash retrying
its message: after a 500 when a request lost its connection, or a 503 + ``Retry-After`` when an
attempt's own write failed (the inbox) or the lease of a claim whose outcome was never committed is
still held. Afterwards every event is stored once with all of its deliveries, every delivery is
terminal, and OneSignal created one notification per sent push, though some were asked twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from notifier.db.models import Delivery
from tests.conftest import PG_ADMIN, live_service, make_settings
from tests.fakes.base import free_port
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.qstash import DeliveryAttempt as QStashCall
from tests.fakes.qstash import QStashEmulator
from tests.reliability.ledger import (
    Providers,
    assert_exactly_once,
    check_events,
    eventually,
    onesignal_key,
    payment_event,
    read_record,
    requests_per_key,
    unit_of,
)
from tests.reliability.test_database_faults import killing_backends

pytestmark = pytest.mark.postgres_only

# QStash's budget per message (Upstash-Retries, published by notifier as NOTIFIER_MAX_RETRIES): a call
# may be cut off by a kill several times; the test must never run out of retries by bad luck.
MAX_RETRIES = 8
LEASE = 1.0
# The service's QStash publish deadline (NOTIFIER_PROVIDER_TIMEOUT_SECONDS, which bounds the OneSignal calls too:
# 0.1 s each here): its default, where the test settings' 2 s ran out once on an overloaded machine (the service,
# the emulator and this test share one process). An event whose publish failed waits, by design, for the sweep
# this test never runs; a publish is HTTP, which the kills do not touch.
PUBLISH_TIMEOUT = 10.0


def cut_off(call: QStashCall) -> bool:
    """The call failed: a 5xx (the request lost its database connection) or no answer at all."""
    return call.status is None or call.status >= 500


async def test_backends_killed_while_qstash_delivers_lose_and_double_nothing(
    postgres_url: str, qstash_emulator: QStashEmulator, onesignal_fake: OneSignalFake
) -> None:
    emulator = qstash_emulator
    # One emulated second is one real second, so notifier's Retry-After (measured against its real
    # lease) is honoured as QStash honours it; QStash's own backoff (12 s, 2m28s, ...) is capped at 1 s.
    emulator.time_scale, emulator.max_wait = 1.0, 1.0
    onesignal_fake.latency = 0.1  # pushes are in flight at OneSignal while pooled connections are killed
    providers = Providers(onesignal=onesignal_fake)
    port = free_port()
    settings = make_settings(
        postgres_url,
        dispatcher="qstash",
        public_url=f"http://127.0.0.1:{port}",
        max_retries=MAX_RETRIES,
        claim_lease_seconds=LEASE,
        provider_timeout_seconds=PUBLISH_TIMEOUT,
        qstash_token=emulator.token,
        qstash_url=emulator.url,
        qstash_current_signing_key=emulator.current_key,
        qstash_next_signing_key=emulator.next_key,
        **providers.settings(),
    )
    database = postgres_url.rsplit("/", 1)[1]
    bodies: list[dict[str, Any]] = []

    def calls_to(fragment: str) -> list[QStashCall]:
        return [c for c in list(emulator.deliveries_log) if fragment in c.url]

    def unit_calls() -> list[QStashCall]:
        """Calls attempting deliveries: a delivery's own route, or a send group's."""
        return calls_to("/v1/qstash/deliveries/") + calls_to("/v1/qstash/groups/")

    def twice_asked() -> list[str]:
        return [key for key, n in requests_per_key(onesignal_fake).items() if n > 1]

    def every_window_was_hit() -> bool:
        return any(map(cut_off, calls_to("/v1/events"))) and any(map(cut_off, unit_calls())) and bool(twice_asked())

    with live_service(settings, port=port) as live:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:

            async def publish(body: dict[str, Any]) -> None:
                response = await http.post(
                    f"{emulator.url}/v2/publish/{live.url}/v1/events",
                    json=body,
                    headers={"Authorization": f"Bearer {emulator.token}", "Upstash-Retries": str(MAX_RETRIES)},
                )
                response.raise_for_status()

            async with killing_backends(PG_ADMIN, database, every=0.3) as kills:
                # Publish small batches until a kill has cut off an event, a delivery call, and a push
                # between OneSignal's accept and our commit (bounded: the assertions below say which not).
                deadline = time.monotonic() + 12
                while len(bodies) < 12 or (not every_window_was_hit() and time.monotonic() < deadline):
                    start = len(bodies)
                    batch = [payment_event(f"qkilled-{n}", f"u-{n}-a", f"u-{n}-b") for n in range(start, start + 3)]
                    bodies += batch
                    await asyncio.gather(*(publish(body) for body in batch))
                    await asyncio.sleep(0.4)
                await asyncio.sleep(1.0)  # keep killing while QStash works through the retries
            assert sum(kills) > 0, "no connection was killed"
            await emulator.drain(30)
            # Ready again. The pool does not pre-ping: a connection killed while idle fails the first
            # request that takes it (here /readyz, "database unreachable": 503) and is replaced.
            probes: list[int] = []

            async def ready() -> bool:
                probes.append((await http.get(f"{live.url}/readyz")).status_code)
                return probes[-1] == 200

            await eventually(ready, timeout=5, interval=0.05, what="/readyz to answer 200")
            assert set(probes) <= {200, 503}, probes
            failed_publishes = live.app.state.runtime.dispatcher.failed
            assert failed_publishes == 0, f"{failed_publishes} units never reached QStash (left for the sweep)"

    record = await read_record(postgres_url)
    check_events(record, bodies)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))
    open_attempts = [(a.delivery_id, a.number) for a in record.attempts if a.finished_at is None or a.outcome is None]
    assert not open_attempts, f"attempts never closed: {open_attempts}"

    # Recovered by QStash alone: every message it was given ended delivered (none failed, no failure
    # callback, no sweep), and the kills did cut calls off that a later retry of the same message finished.
    assert emulator.failure_callbacks == [], emulator.failure_callbacks
    assert emulator.dlq == []
    assert Counter(m.state for m in emulator.messages.values()) == Counter({"DELIVERED": len(emulator.messages)})
    assert not emulator.schedules
    event_calls, delivery_calls = calls_to("/v1/events"), unit_calls()
    assert any(map(cut_off, event_calls)), "no event request was cut off: the test proved nothing"
    assert any(map(cut_off, delivery_calls)), "no delivery call was cut off: the test proved nothing"
    by_message: dict[str, list[QStashCall]] = {}
    for call in event_calls + delivery_calls:
        by_message.setdefault(call.message_id, []).append(call)
    for message_id, calls in by_message.items():
        *before, last = calls
        history = (message_id, [(c.status, c.error) for c in calls])
        assert last.ok, history
        assert not any(c.ok for c in before), history
        assert [c.retried for c in calls] == list(range(len(calls)))  # QStash's own retries, in order

    # One message per push and in-app send group (each event's two users) or delivery alone (an event retried as
    # a duplicate publishes nothing again), called back until it answered 2xx.
    def route(d: Delivery) -> str:
        unit = f"groups/{d.send_group}" if d.send_group else f"deliveries/{d.id}"
        return f"{live.url}/v1/qstash/{unit}"

    dispatched = Counter({route(d) for d in record.of("push") + record.of("in_app")})
    published = Counter(
        m.destination
        for m in emulator.messages.values()
        if "/v1/qstash/deliveries/" in m.destination or "/v1/qstash/groups/" in m.destination
    )
    assert published == dispatched

    # A push asked twice was cut off between OneSignal's accept and our commit; the retry carried the
    # same key, OneSignal replayed its first answer, and the attempt cut off is on record as interrupted.
    repeated = twice_asked()
    assert repeated, "no push was cut off between the provider's accept and our commit: the test proved nothing"
    pushes: dict[str, list[Delivery]] = {}
    for d in record.of("push"):
        pushes.setdefault(onesignal_key(unit_of(d)), []).append(d)
    for key in repeated:
        for push in pushes[key]:
            outcomes = [a.outcome for a in record.attempts_of(push.id)]
            assert outcomes[-1] == "sent", outcomes
            assert "interrupted" in outcomes, outcomes
