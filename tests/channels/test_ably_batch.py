"""Batch announcements: ``AblyRealtime.publish_many`` (one REST ``POST /messages``) and the in-app channel's
use of it for a send group, against the TLS loopback fake."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from notifier.channels.ably import AblyRealtime
from notifier.channels.base import Announcement, Message, MessageGroup, Outcome, Recipient
from notifier.channels.in_app import InboxChannel
from notifier.types import ChannelName, Reason
from tests.fakes.ably import AblyFake, ably_error
from tests.fakes.base import Fault


@pytest.fixture
async def ably(ably_fake: AblyFake) -> AsyncIterator[AblyRealtime]:
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=0.5)
    yield realtime
    await realtime.aclose()


def announcement(user: str, message_id: str) -> Announcement:
    return Announcement(f"notifications:{user}", "comment.created", message_id, {"id": f"inbox-{message_id}"})


async def test_one_request_announces_each_message_on_its_own_channel(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    results = await ably.publish_many([announcement("u1", "d1"), announcement("u2", "d2"), announcement("u3", "d3")])

    assert [(r.outcome, r.provider_message_id) for r in results] == [
        (Outcome.sent, "d1"),
        (Outcome.sent, "d2"),
        (Outcome.sent, "d3"),
    ]
    assert results[1].detail == "serial fake-000002@notifications:u2"
    [request] = ably_fake.requests
    assert (request.method, request.path) == ("POST", "/messages")
    specs = request.json()
    assert [spec["channels"] for spec in specs] == [["notifications:u1"], ["notifications:u2"], ["notifications:u3"]]
    [message] = specs[0]["messages"]
    assert (message["name"], message["id"], message["encoding"]) == ("comment.created", "d1", "json")
    assert json.loads(message["data"]) == {"id": "inbox-d1"}
    for user, message_id in (("u1", "d1"), ("u2", "d2"), ("u3", "d3")):
        [published] = ably_fake.messages(f"notifications:{user}")
        assert (published.id, published.data) == (message_id, {"id": f"inbox-{message_id}"})


async def test_a_repeated_batch_announces_each_message_once(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    batch = [announcement("u1", "d1"), announcement("u2", "d2")]
    first = await ably.publish_many(batch)
    again = await ably.publish_many(batch)  # a retry of the group

    assert [r.outcome for r in first + again] == [Outcome.sent] * 4
    assert [len(ably_fake.messages(f"notifications:{u}")) for u in ("u1", "u2")] == [1, 1]


async def test_a_channel_refused_inside_the_batch_fails_only_its_own(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    ably_fake.refused["notifications:u2"] = (400, 40010)

    ok, refused = await ably.publish_many([announcement("u1", "d1"), announcement("u2", "d2")])

    assert ok.outcome is Outcome.sent
    assert (refused.outcome, refused.reason, refused.http_status) == (Outcome.failed, Reason.rejected, 400)
    assert "40010" in refused.detail


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (ably_error(503, 50300), Outcome.retry),
        (ably_error(429, 42910), Outcome.retry),
        (ably_error(400, 40000), Outcome.failed),
    ],
)
async def test_a_refused_request_classifies_every_announcement(
    ably: AblyRealtime, ably_fake: AblyFake, fault: Fault, outcome: Outcome
) -> None:
    ably_fake.fail_next(fault)

    results = await ably.publish_many([announcement("u1", "d1"), announcement("u2", "d2")])

    assert [r.outcome for r in results] == [outcome, outcome]
    assert all(str(fault.headers["X-Ably-ErrorCode"]) in r.detail for r in results)
    assert ably_fake.messages("notifications:u1") == []


async def test_a_hanging_batch_is_retried_later(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    ably_fake.fail_next(Fault.hang(2))

    results = await ably.publish_many([announcement("u1", "d1"), announcement("u2", "d2")])

    assert [r.outcome for r in results] == [Outcome.retry, Outcome.retry]


async def test_nothing_to_announce_makes_no_request(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    assert await ably.publish_many([]) == []
    assert ably_fake.requests == []


# --- the in-app channel ---------------------------------------------------------------------------


class MemoryStore:
    def __init__(self, failing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.failing = failing
        self.items: dict[uuid.UUID, dict[str, Any]] = {}

    async def store(self, message: Message) -> Mapping[str, Any]:
        if message.recipient.id in self.failing:
            raise RuntimeError("database down")
        return self.items.setdefault(message.delivery_id, {"id": f"item-{message.delivery_id}", "title": message.title})


def group_of(*users: str) -> MessageGroup:
    event = uuid.uuid4()
    messages = tuple(
        Message(uuid.uuid4(), event, "comment.created", ChannelName.in_app, Recipient(user), "Title", "Body")
        for user in users
    )
    return MessageGroup(str(uuid.uuid4()), messages)


async def test_a_group_is_announced_with_one_batch_request(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    store = MemoryStore()
    group = group_of("u1", "u2", "u3")

    results = await InboxChannel(store, ably).send_group(group)

    assert [(r.outcome, r.detail) for r in results] == [(Outcome.sent, "stored; announced")] * 3
    assert [r.provider_message_id for r in results] == [f"item-{m.delivery_id}" for m in group.messages]
    assert [r.path for r in ably_fake.requests] == ["/messages"]
    for message in group.messages:
        [published] = ably_fake.messages(f"notifications:{message.recipient.id}")
        assert published.id == str(message.delivery_id)
        assert published.data == store.items[message.delivery_id]


async def test_a_message_alone_is_published_on_its_channel(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    [result] = await InboxChannel(MemoryStore(), ably).send_group(group_of("u1"))

    assert result.outcome is Outcome.sent
    assert [r.path for r in ably_fake.requests] == ["/channels/notifications:u1/messages"]


async def test_messages_of_concurrent_attempts_share_one_batch_request(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    channel = InboxChannel(MemoryStore(), ably)
    alone = [group_of("u1"), group_of("u2"), group_of("u3", "u4")]

    results = await asyncio.gather(*(channel.send_group(group) for group in alone))

    assert [r.outcome for group in results for r in group] == [Outcome.sent] * 4
    [request] = ably_fake.requests
    assert request.path == "/messages"
    assert sorted(spec["channels"][0] for spec in request.json()) == [f"notifications:u{n}" for n in range(1, 5)]
    for group in alone:
        for message in group.messages:
            [published] = ably_fake.messages(f"notifications:{message.recipient.id}")
            assert published.id == str(message.delivery_id)


async def test_members_not_stored_are_not_announced_and_retry(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    group = group_of("u1", "down", "u3")

    results = await InboxChannel(MemoryStore({"down"}), ably).send_group(group)

    assert [r.outcome for r in results] == [Outcome.sent, Outcome.retry, Outcome.sent]
    assert results[1].detail == "inbox store failed: RuntimeError"
    [request] = ably_fake.requests
    assert [spec["channels"] for spec in request.json()] == [["notifications:u1"], ["notifications:u3"]]


async def test_a_transient_batch_failure_retries_every_member_and_a_refusal_keeps_the_stored_item(
    ably: AblyRealtime, ably_fake: AblyFake
) -> None:
    channel = InboxChannel(MemoryStore(), ably)
    group = group_of("u1", "u2")
    ably_fake.fail_next(ably_error(503, 50300))
    assert [r.outcome for r in await channel.send_group(group)] == [Outcome.retry, Outcome.retry]

    ably_fake.refused["notifications:u2"] = (400, 40010)
    announced, refused = await channel.send_group(group)  # the retry, under the same message ids

    assert (announced.outcome, announced.detail) == (Outcome.sent, "stored; announced")
    assert refused.outcome is Outcome.sent  # the inbox item is the effect; the announcement was refused for good
    assert refused.detail.startswith("stored; announce refused: ably 400/40010")
    assert [m.id for m in ably_fake.messages("notifications:u1")] == [str(group.messages[0].delivery_id)]


async def test_without_realtime_a_group_is_only_stored(ably_fake: AblyFake) -> None:
    results = await InboxChannel(MemoryStore({"down"})).send_group(group_of("u1", "down"))

    assert [(r.outcome, r.detail) for r in results] == [
        (Outcome.sent, "stored"),
        (Outcome.retry, "inbox store failed: RuntimeError"),
    ]
