"""From POST /v1/events to each provider's recorded request, through the real app and SDKs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Service
from tests.fakes.ably import AblyFake
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.smtp import SmtpServer

CHAT = {"conversation_id": "c-1", "sender_name": "Ann", "preview": "Are you there?"}
BOOKING = {"booking_id": "b-1", "guest_name": "Ann Lee", "property": "Seaview 4", "check_in": "2026-12-01"}
Factory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


async def test_in_app_is_stored_and_announced_on_the_users_ably_channel(
    service_factory: Factory, ably_fake: AblyFake
) -> None:
    async with service_factory(ably_api_key=ably_fake.api_key, ably_rest_url=ably_fake.url) as svc:
        response = await svc.post_event({"type": "booking.confirmed", "recipients": ["user-1"], "data": BOOKING})
        [in_app] = [d for d in response.json()["deliveries"] if d["channel"] == "in_app"]
        await svc.drain()
        [item] = (await svc.get("/v1/users/user-1/inbox")).json()["data"]
    [message] = ably_fake.messages("notifications:user-1")
    assert message.id == in_app["id"]  # idempotent publish: the delivery id
    assert message.name == "booking.confirmed"
    assert message.data["id"] == item["id"]
    assert message.data["title"] == "Booking confirmed: Seaview 4"


async def test_chat_push_is_suppressed_while_the_reader_is_present(
    service_factory: Factory, ably_fake: AblyFake, onesignal_fake: OneSignalFake
) -> None:
    ably_fake.set_present("chat:c-1", ["user-1"])
    async with service_factory(
        ably_api_key=ably_fake.api_key,
        ably_rest_url=ably_fake.url,
        onesignal_app_id=onesignal_fake.app_id,
        onesignal_rest_api_key=onesignal_fake.api_key,
        onesignal_api_url=onesignal_fake.url,
    ) as svc:
        response = await svc.post_event(
            {"type": "chat.message.offline", "recipients": ["user-1", "user-2"], "data": CHAT}
        )
        deliveries = {(d["user_id"], d["channel"]): d for d in response.json()["deliveries"]}
        await svc.drain()
    assert (deliveries[("user-1", "push")]["status"], deliveries[("user-1", "push")]["reason"]) == (
        "suppressed",
        "recipient_online",
    )
    assert deliveries[("user-2", "push")]["status"] == "queued"
    assert [n.external_ids for n in onesignal_fake.notifications] == [["user-2"]]
    assert len(ably_fake.messages("notifications:user-1")) == 1  # in-app is still stored and announced


async def test_presence_unknown_means_notify(
    service_factory: Factory, ably_fake: AblyFake, onesignal_fake: OneSignalFake
) -> None:
    from tests.fakes.ably import ably_error

    ably_fake.set_present("chat:c-1", ["user-1"])
    ably_fake.fail_next(ably_error(503, 50300))  # the presence lookup fails
    async with service_factory(
        ably_api_key=ably_fake.api_key,
        ably_rest_url=ably_fake.url,
        onesignal_app_id=onesignal_fake.app_id,
        onesignal_rest_api_key=onesignal_fake.api_key,
        onesignal_api_url=onesignal_fake.url,
    ) as svc:
        response = await svc.post_event({"type": "chat.message.offline", "recipients": ["user-1"], "data": CHAT})
        [push] = [d for d in response.json()["deliveries"] if d["channel"] == "push"]
    assert push["status"] == "queued"


async def test_email_over_smtp_when_knock_is_not_configured(service_factory: Factory, smtp_server: SmtpServer) -> None:
    async with service_factory(
        smtp_host=smtp_server.host, smtp_port=smtp_server.port, smtp_from="notify@example.com", smtp_starttls=False
    ) as svc:
        response = await svc.post_event(
            {
                "type": "booking.confirmed",
                "data": BOOKING,
                "recipients": [{"id": "user-1", "email": "ann@example.com", "name": "Ann"}],
            }
        )
        [email] = [d for d in response.json()["deliveries"] if d["channel"] == "email"]
        await svc.drain()
        stored = (await svc.get(f"/v1/events/{response.json()['event_id']}")).json()
    [message] = smtp_server.messages
    assert message["To"] == "Ann <ann@example.com>"
    assert message["Subject"] == "Booking confirmed: Seaview 4"
    assert email["id"] in message["Message-ID"]
    assert {part.get_content_type() for part in message.walk()} >= {"text/plain", "text/html"}
    assert [d["status"] for d in stored["deliveries"] if d["channel"] == "email"] == ["sent"]


async def test_startup_logs_which_channels_are_live(
    service_factory: Factory, onesignal_fake: OneSignalFake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="notifier.channels")
    settings: dict[str, Any] = {
        "onesignal_app_id": onesignal_fake.app_id,
        "onesignal_rest_api_key": "secret-key-value",
        "onesignal_api_url": onesignal_fake.url,
    }
    async with service_factory(**settings):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "notifier.channels"]
    assert "channel push is live via onesignal" in lines
    assert "channel email is off: its provider is not configured" in lines
    assert "channel in_app is live via inbox" in lines
    assert "secret-key-value" not in caplog.text
