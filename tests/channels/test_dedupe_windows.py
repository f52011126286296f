"""Dedupe windows: what each channel declares, and what its provider does inside and past the window.

The real channels and SDKs run against the loopback fakes, whose clocks are moved forward instead of
sleeping. Inside the window a repeated delivery creates nothing new; past it the provider creates a
second notification under the same key. That is the at-least-once boundary, which the retry schedule
(``notifier.retry.retry_delay``) keeps retries away from where it can.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from notifier.channels.ably import AblyRealtime
from notifier.channels.base import Channel, Message, Outcome, Recipient
from notifier.channels.in_app import InboxChannel, realtime_channel_for
from notifier.channels.knock import KnockEmail
from notifier.channels.onesignal import OneSignalPush
from notifier.channels.smtp import SmtpEmail
from notifier.delivery.inbox_store import DatabaseInboxStore
from notifier.types import ChannelName
from tests.conftest import Sessions
from tests.fakes.ably import AblyFake
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake

DAY = 24 * 60 * 60


def message(channel: ChannelName, *, delivery_id: uuid.UUID | None = None) -> Message:
    return Message(
        delivery_id=delivery_id or uuid.uuid4(),
        event_id=uuid.uuid4(),
        event_type="payment.received",
        channel=channel,
        recipient=Recipient("user-1", "ann@example.com", "Ann"),
        title="Payment received",
        body="Ann paid 10.00 EUR.",
    )


@pytest.fixture
async def push(onesignal_fake: OneSignalFake) -> AsyncIterator[OneSignalPush]:
    channel = OneSignalPush(
        app_id=onesignal_fake.app_id, api_key=onesignal_fake.api_key, api_url=onesignal_fake.url, timeout=2.0
    )
    yield channel
    await channel.aclose()


@pytest.fixture
async def knock(knock_fake: KnockFake) -> AsyncIterator[KnockEmail]:
    channel = KnockEmail(api_key=knock_fake.api_key, base_url=knock_fake.url, workflow_prefix="", timeout=2.0)
    yield channel
    await channel.aclose()


@pytest.fixture
async def ably(ably_fake: AblyFake) -> AsyncIterator[AblyRealtime]:
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=2.0)
    yield realtime
    await realtime.aclose()


# --- what is declared ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "window"),
    [
        (OneSignalPush, dt.timedelta(days=30)),  # idempotency_key
        (KnockEmail, dt.timedelta(hours=24)),  # Idempotency-Key
        (AblyRealtime, dt.timedelta(minutes=2)),  # message id, per channel
        (SmtpEmail, None),  # the Message-ID is only a hint to the receiver
    ],
)
def test_each_provider_declares_its_dedupe_window(channel: Any, window: dt.timedelta | None) -> None:
    assert channel.dedupe_window == window


def test_each_fake_defaults_to_its_providers_window() -> None:
    fakes = [
        (OneSignalFake(app_id="app", api_key="key"), OneSignalPush.dedupe_window),
        (KnockFake(), KnockEmail.dedupe_window),
        (AblyFake(), AblyRealtime.dedupe_window),
    ]
    for fake, declared in fakes:
        assert declared is not None
        assert fake.window == declared.total_seconds(), type(fake).__name__


async def test_the_in_app_window_is_its_announcements(sessions: Sessions, ably: AblyRealtime) -> None:
    store = DatabaseInboxStore(sessions)
    announced, stored_only = InboxChannel(store, ably), InboxChannel(store)
    assert isinstance(announced, Channel)
    # The inbox keeps one row per delivery for good; only the Ably announcement has a window.
    assert (announced.dedupe_window, stored_only.dedupe_window) == (dt.timedelta(minutes=2), None)


# --- inside and past the window, per provider -----------------------------------------------------------


async def test_onesignal_replays_a_key_for_30_days_then_creates_a_second_notification(
    push: OneSignalPush, onesignal_fake: OneSignalFake
) -> None:
    sent = message(ChannelName.push)
    first = await push.send(sent)
    onesignal_fake.advance(30 * DAY - 60)
    inside = await push.send(sent)
    assert (inside.provider_message_id, inside.detail) == (first.provider_message_id, "replayed")
    assert len(onesignal_fake.notifications) == 1

    onesignal_fake.advance(120)  # 30 days and a minute after the first request
    past = await push.send(sent)
    # The honest boundary: OneSignal has forgotten the key and sends the push again.
    assert (past.outcome, past.provider_message_id == first.provider_message_id) == (Outcome.sent, False)
    keys = [n.body["idempotency_key"] for n in onesignal_fake.notifications]
    assert keys == [str(sent.idempotency_uuid)] * 2


async def test_knock_replays_a_key_for_24_hours_then_starts_a_second_run(
    knock: KnockEmail, knock_fake: KnockFake
) -> None:
    sent = message(ChannelName.email)
    first = await knock.send(sent)
    knock_fake.advance(DAY - 60)
    assert (await knock.send(sent)).provider_message_id == first.provider_message_id
    assert len(knock_fake.triggers) == 1

    knock_fake.advance(120)
    past = await knock.send(sent)
    # Past the window Knock starts the workflow again: a second email, under the same Idempotency-Key.
    assert (past.outcome, past.provider_message_id == first.provider_message_id) == (Outcome.sent, False)
    assert [t.idempotency_key for t in knock_fake.triggers] == [sent.idempotency_key] * 2


async def test_in_app_is_stored_once_but_announced_again_past_ablys_2_minutes(
    sessions: Sessions, ably: AblyRealtime, ably_fake: AblyFake
) -> None:
    in_app = InboxChannel(DatabaseInboxStore(sessions), ably)
    sent = message(ChannelName.in_app)
    first = await in_app.send(sent)
    ably_fake.advance(119)
    inside = await in_app.send(sent)
    channel = realtime_channel_for("user-1")
    assert len(ably_fake.messages(channel)) == 1

    ably_fake.advance(2)
    past = await in_app.send(sent)
    # One inbox item throughout (its id is the result's provider id); Ably announces it a second time,
    # with the same message id, so a client that remembers ids it has shown can drop the repeat.
    assert first.provider_message_id == inside.provider_message_id == past.provider_message_id
    assert [m.id for m in ably_fake.messages(channel)] == [sent.idempotency_key] * 2
