"""QStash mode: duplicate deliveries of events and of delivery calls during a provider storm.

QStash delivers at least once: here every event message and every delivery message is delivered
three times at once on top of QStash's own retries, while OneSignal fails the first two calls of
every delivery. One event per message, one notification per delivery.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import live_service, make_settings
from tests.fakes.base import Fault, free_port
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.qstash import QStashEmulator
from tests.reliability.faults import first, in_front_of, onesignal_key_of
from tests.reliability.ledger import Providers, assert_exactly_once, payment_event, read_record


async def test_redelivered_events_and_delivery_calls_during_a_storm_send_each_notification_once(
    database_url: str, qstash_emulator: QStashEmulator, onesignal_fake: OneSignalFake
) -> None:
    emulator = qstash_emulator
    providers = Providers(onesignal=onesignal_fake)
    with in_front_of(onesignal_fake.app, onesignal_key_of, first(2, Fault.http(503))) as (push_url, storm):
        port = free_port()
        settings = make_settings(
            database_url,
            dispatcher="qstash",
            public_url=f"http://127.0.0.1:{port}",
            max_retries=5,
            qstash_token=emulator.token,
            qstash_url=emulator.url,
            qstash_current_signing_key=emulator.current_key,
            qstash_next_signing_key=emulator.next_key,
            **(providers.settings() | {"onesignal_api_url": push_url}),
        )
        with live_service(settings, port=port) as live:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                event_messages = []
                for i in range(4):
                    body = payment_event(f"unused-{i}", f"u-{i}")
                    del body["idempotency_key"]  # the QStash message id is the idempotency key
                    published = await http.post(
                        f"{emulator.url}/v2/publish/{live.url}/v1/events",
                        json=body,
                        headers={"Authorization": f"Bearer {emulator.token}"},
                    )
                    published.raise_for_status()
                    event_messages.append(published.json()["messageId"])
                bursts = await asyncio.gather(*(emulator.deliver_concurrently(m, 3) for m in event_messages))
                assert all(call.status in (200, 202) for burst in bursts for call in burst)
                calls = [m for m in emulator.messages.values() if "/v1/qstash/deliveries/" in m.destination]
                await asyncio.gather(*(emulator.deliver_concurrently(m.id, 3) for m in calls))
                await emulator.drain(30)
    record = await read_record(database_url)
    assert sorted(e.source_message_id or "" for e in record.events) == sorted(event_messages)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))
    assert min(storm.faulted.values()) == 2  # every push met the storm
