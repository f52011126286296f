"""``notifier send-test``: one message straight through a channel, to check a provider's configuration."""

from __future__ import annotations

import uuid
from typing import Any

from notifier import db
from notifier.app import build_channels
from notifier.channels.ably import AblyRealtime
from notifier.channels.base import Message, Recipient
from notifier.config import Settings
from notifier.db import users
from notifier.delivery.inbox_store import DatabaseInboxStore
from notifier.errors import ConfigurationError
from notifier.types import ChannelName


async def send_test_notification(settings: Settings, *, user_id: str, channel: str) -> dict[str, Any]:
    """Send a test message to ``user_id`` on ``channel``; return what the provider said."""
    engine = db.create_engine(settings.database_url)
    realtime = AblyRealtime.from_settings(settings)
    try:
        if settings.is_sqlite:
            await db.migrate(engine)
        sessions = db.create_session_factory(engine)
        async with sessions() as session:
            user = await users.get(session, user_id)
        registry = build_channels(settings, DatabaseInboxStore(sessions), realtime)
        try:
            implementation = registry.get(channel)
            if implementation is None:
                raise ConfigurationError(f"channel '{channel}' has no configured provider")
            message = Message(
                delivery_id=uuid.uuid4(),
                event_id=uuid.uuid4(),
                event_type="notifier.test",
                channel=ChannelName(channel),
                recipient=Recipient(
                    id=user_id,
                    email=user.email if user else None,
                    name=user.name if user else None,
                    locale=user.locale if user else None,
                ),
                title="Test notification from notifier",
                body="If you can read this, the channel works.",
                html="<p>If you can read this, the channel works.</p>" if channel == "email" else None,
            )
            result = await implementation.send(message)
        finally:
            await registry.aclose()
        return {
            "channel": channel,
            "provider": implementation.provider,
            "status": str(result.outcome),
            "provider_message_id": result.provider_message_id,
            "reason": result.reason,
            "http_status": result.http_status,
            "detail": result.detail,
        }
    finally:
        if realtime is not None:
            await realtime.aclose()
        await engine.dispose()
