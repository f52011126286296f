"""The real service in QStash mode under uvicorn, wired to the QStash emulator, OneSignal and SMTP fakes.

Events are published through the emulator, which signs every call like QStash; the tests read
the database directly (their own engine, on the test's loop) to check what was stored.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from notifier import db
from notifier.config import Settings
from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition, Event, InboxMessage
from tests.conftest import SERVICE_KEY, LiveService, live_service, make_settings
from tests.fakes.base import free_port
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.qstash import DeliveryAttempt as QStashCall
from tests.fakes.qstash import QStashEmulator
from tests.fakes.smtp import SmtpServer

MAX_RETRIES = 2


def chat_event(*recipients: Any, conversation: str = "c-1", **overrides: Any) -> dict[str, Any]:
    """chat.message.offline: push (falls back to email) and in_app for each recipient."""
    body: dict[str, Any] = {
        "type": "chat.message.offline",
        "recipients": list(recipients) or [{"id": "user-1", "email": "u1@example.com"}],
        "actor": "user-9",
        "data": {"conversation_id": conversation, "sender_name": "Bob", "preview": "are you there?"},
    }
    body.update(overrides)
    return body


@dataclass
class Stack:
    live: LiveService
    settings: Settings
    emulator: QStashEmulator
    onesignal: OneSignalFake
    smtp: SmtpServer
    engine: AsyncEngine
    http: httpx.AsyncClient

    def url(self, path: str) -> str:
        return f"{self.live.url}{path}"

    def delivery_url(self, delivery_id: uuid.UUID | str) -> str:
        return self.url(f"/v1/qstash/deliveries/{delivery_id}")

    async def publish(self, destination: str, body: dict[str, Any] | bytes, **headers: str) -> str:
        """Publish through the emulator's API (as a producer would); return the QStash message id."""
        content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
        response = await self.http.post(
            f"{self.emulator.url}/v2/publish/{destination}",
            content=content,
            headers={"Authorization": f"Bearer {self.emulator.token}", "Content-Type": "application/json", **headers},
        )
        response.raise_for_status()
        return str(response.json()["messageId"])

    async def publish_event(self, body: dict[str, Any], **headers: str) -> str:
        return await self.publish(self.url("/v1/events"), body, **headers)

    async def post_event(self, body: dict[str, Any]) -> httpx.Response:
        """POST /v1/events with the service key (not through QStash)."""
        return await self.http.post(
            self.url("/v1/events"), json=body, headers={"Authorization": f"Bearer {SERVICE_KEY}"}
        )

    async def signed_post(self, path: str, body: bytes, **sign: Any) -> httpx.Response:
        """POST ``body`` to ``path`` signed like QStash for exactly that URL (override claims with ``sign``)."""
        signature = self.emulator.sign(body, self.url(path), **sign)
        headers = {"Upstash-Signature": signature, "Content-Type": "application/json"}
        return await self.http.post(self.url(path), content=body, headers=headers)

    def unit_calls(self, delivery: Delivery) -> list[QStashCall]:
        """QStash's calls of the route that carries ``delivery``: its send group's, or its own when it goes alone."""
        if delivery.send_group is not None:
            return self.calls(f"/v1/qstash/groups/{delivery.send_group}")
        return self.calls(f"/v1/qstash/deliveries/{delivery.id}")

    def notified(self) -> list[str]:
        """The users OneSignal created notifications for, once per notification that named them, sorted."""
        return sorted(user for n in self.onesignal.notifications for user in n.external_ids)

    def calls(self, path: str) -> list[QStashCall]:
        """What the emulator sent to ``path`` of the service, and how it was answered."""
        return self.emulator.attempts(url=self.url(path))

    async def scalar(self, statement: Any) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(statement)).scalar()

    async def execute(self, statement: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(statement)

    async def events(self) -> list[Event]:
        async with db.create_session_factory(self.engine)() as session:
            return list((await session.execute(sa.select(Event).order_by(col(Event.received_at)))).scalars())

    async def deliveries(self, event_id: uuid.UUID | str | None = None) -> list[Delivery]:
        statement = sa.select(Delivery).order_by(col(Delivery.user_id), col(Delivery.channel))
        if event_id is not None:
            statement = statement.where(col(Delivery.event_id) == uuid.UUID(str(event_id)))
        async with db.create_session_factory(self.engine)() as session:
            return list((await session.execute(statement)).scalars())

    async def delivery_by_id(self, delivery_id: uuid.UUID) -> Delivery:
        async with db.create_session_factory(self.engine)() as session:
            found = await session.get(Delivery, delivery_id)
        assert found is not None, delivery_id
        return found

    async def delivery(self, event_id: uuid.UUID | str, user_id: str, channel: str) -> Delivery:
        [found] = [d for d in await self.deliveries(event_id) if (d.user_id, d.channel) == (user_id, channel)]
        return found

    async def attempts(self, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
        statement = (
            sa.select(DeliveryAttempt)
            .where(col(DeliveryAttempt.delivery_id) == delivery_id)
            .order_by(col(DeliveryAttempt.number))
        )
        async with db.create_session_factory(self.engine)() as session:
            return list((await session.execute(statement)).scalars())

    async def inbox(self) -> list[InboxMessage]:
        async with db.create_session_factory(self.engine)() as session:
            rows = await session.execute(sa.select(InboxMessage).order_by(col(InboxMessage.created_at)))
            return list(rows.scalars())

    async def transitions(self, delivery_id: uuid.UUID) -> list[DeliveryTransition]:
        statement = (
            sa.select(DeliveryTransition)
            .where(col(DeliveryTransition.delivery_id) == delivery_id)
            .order_by(col(DeliveryTransition.at), col(DeliveryTransition.to_status))
        )
        async with db.create_session_factory(self.engine)() as session:
            return list((await session.execute(statement)).scalars())


StackFactory = Callable[..., contextlib.AbstractAsyncContextManager[Stack]]


@pytest.fixture
def stack_factory(
    database_url: str, qstash_emulator: QStashEmulator, onesignal_fake: OneSignalFake, smtp_server: SmtpServer
) -> StackFactory:
    """``async with stack_factory(**setting_overrides) as stack``: notifier (QStash mode, NOTIFIER_MAX_RETRIES=2)
    with push via OneSignal and email via SMTP, any setting overridden."""

    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Stack]:
        port = free_port()
        values: dict[str, Any] = {
            "dispatcher": "qstash",
            "public_url": f"http://127.0.0.1:{port}",
            "max_retries": MAX_RETRIES,
            "qstash_token": qstash_emulator.token,
            "qstash_url": qstash_emulator.url,
            "qstash_current_signing_key": qstash_emulator.current_key,
            "qstash_next_signing_key": qstash_emulator.next_key,
            "onesignal_app_id": onesignal_fake.app_id,
            "onesignal_rest_api_key": onesignal_fake.api_key,
            "onesignal_api_url": onesignal_fake.url,
            "smtp_host": smtp_server.host,
            "smtp_port": smtp_server.port,
            "smtp_from": "notifier@example.com",
            "smtp_starttls": False,
        }
        settings = make_settings(database_url, **(values | overrides))
        with live_service(settings, port=port) as live:
            engine = db.create_engine(database_url)
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                    yield Stack(live, settings, qstash_emulator, onesignal_fake, smtp_server, engine, http)
                await qstash_emulator.drain(10)  # nothing may be left in flight against a stopping service
            finally:
                await engine.dispose()

    return make


@pytest.fixture
async def stack(stack_factory: StackFactory) -> AsyncIterator[Stack]:
    """notifier (QStash mode, NOTIFIER_MAX_RETRIES=2) with push via OneSignal and email via SMTP."""
    async with stack_factory() as running:
        yield running
