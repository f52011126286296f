"""The push body is built as plain JSON, not through the SDK's models: it must still be exactly what the SDK's
``Notification`` model would send (every field known to the model, typed as the model requires)."""

from __future__ import annotations

import uuid

import onesignal
from onesignal.model.notification import Notification

from notifier.channels.base import Message, MessageGroup, Recipient
from notifier.channels.onesignal import build_notification
from notifier.types import ChannelName


def test_the_body_is_what_the_sdk_model_would_serialize() -> None:
    event = uuid.uuid4()
    group = MessageGroup(
        str(uuid.uuid4()),
        tuple(
            Message(
                uuid.uuid4(),
                event,
                "chat.message.offline",
                ChannelName.push,
                Recipient(user, locale=locale),
                "New reply",
                "Ann replied",
                data={"conversation_id": "c-1", "at": uuid.UUID(int=7), "n": 2},
                action_url="https://app.example/c/1",
            )
            for user, locale in (("u-1", "de-AT"), ("u-2", None))
        ),
    )

    body = build_notification(group, app_id="app-1")

    model = Notification(**body)  # the SDK's type checks on: every field and type must be the model's
    assert onesignal.ApiClient().sanitize_for_serialization(model) == body
    assert body["include_aliases"] == {"external_id": ["u-1", "u-2"]}
    assert body["headings"] == {"en": "New reply", "de": "New reply"}
    assert body["data"] == {
        "conversation_id": "c-1",
        "at": str(uuid.UUID(int=7)),
        "n": 2,
        "action_url": "https://app.example/c/1",
    }
    assert body["idempotency_key"] == str(group.idempotency_uuid)
