"""Counting what the providers created against what the database recorded: nothing lost, nothing doubled.

The fakes dedupe by idempotency key as the real providers do (OneSignal by ``idempotency_key``, Knock by
``Idempotency-Key``, Ably by message id per channel), so what they *created* is what a person would
have received. ``assert_exactly_once`` compares that, per delivery, with the deliveries the database
says were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from notifier import db
from notifier.channels.base import IDEMPOTENCY_NAMESPACE
from notifier.db.models import Delivery, DeliveryAttempt, Event, InboxMessage
from notifier.types import TERMINAL_STATUSES
from tests.conftest import SERVICE_KEY
from tests.fakes.ably import AblyFake
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.smtp import SmtpServer

PAYMENT = {"payment_id": "p-1", "amount": "10.00", "currency": "EUR", "payer_name": "Ann Lee"}
SMTP_FROM = "notifier@example.com"


def payment_event(key: str, *recipients: str, **overrides: Any) -> dict[str, Any]:
    """payment.received to ``recipients`` (each with an email address): push, email and in_app for each."""
    body: dict[str, Any] = {
        "type": "payment.received",
        "idempotency_key": key,
        "recipients": [{"id": r, "email": f"{r}@example.com"} for r in recipients],
        "data": {**PAYMENT, "payment_id": key},
    }
    body.update(overrides)
    return body


@dataclass
class Providers:
    """The fakes a test wired in; ``settings()`` points notifier at them."""

    onesignal: OneSignalFake | None = None
    knock: KnockFake | None = None
    smtp: SmtpServer | None = None
    ably: AblyFake | None = None
    onesignal_url: str | None = None  # override: e.g. a refused port where the fake starts later

    def settings(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if self.onesignal is not None:
            values |= {
                "onesignal_app_id": self.onesignal.app_id,
                "onesignal_rest_api_key": self.onesignal.api_key,
                "onesignal_api_url": self.onesignal_url or self.onesignal.url,
            }
        if self.knock is not None:
            values |= {"knock_api_key": self.knock.api_key, "knock_base_url": self.knock.url}
        if self.smtp is not None:
            values |= {
                "smtp_host": self.smtp.host,
                "smtp_port": self.smtp.port,
                "smtp_from": SMTP_FROM,
                "smtp_starttls": False,
            }
        if self.ably is not None:
            values |= {"ably_api_key": self.ably.api_key, "ably_rest_url": self.ably.url}
        return values

    def env(self) -> dict[str, str]:
        """The same configuration as environment variables, for a notifier subprocess."""
        return {name.upper(): str(value) for name, value in self.settings().items()}


@dataclass
class Record:
    """What the database holds after a run."""

    events: list[Event]
    deliveries: list[Delivery]
    attempts: list[DeliveryAttempt]
    inbox: list[InboxMessage]
    by_id: dict[uuid.UUID, Delivery] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {d.id: d for d in self.deliveries}

    def of(self, channel: str, status: str | None = None) -> list[Delivery]:
        return [d for d in self.deliveries if d.channel == channel and (status is None or d.status == status)]

    def attempts_of(self, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
        return sorted((a for a in self.attempts if a.delivery_id == delivery_id), key=lambda a: a.number)


@contextlib.asynccontextmanager
async def db_session(database_url: str) -> AsyncIterator[AsyncSession]:
    """A session on its own engine (any process's database), disposed of afterwards."""
    engine = db.create_engine(database_url, pool_size=1)
    try:
        async with db.create_session_factory(engine)() as session:
            yield session
    finally:
        await engine.dispose()


async def read_record(database_url: str) -> Record:
    """Read events, deliveries, attempts and inbox with a fresh engine (works for any process's database)."""
    async with db_session(database_url) as session:
        events = list((await session.execute(sa.select(Event))).scalars())
        deliveries = list((await session.execute(sa.select(Delivery))).scalars())
        attempts = list((await session.execute(sa.select(DeliveryAttempt))).scalars())
        inbox = list((await session.execute(sa.select(InboxMessage))).scalars())
    return Record(events, deliveries, attempts, inbox)


def check_events(record: Record, bodies: list[dict[str, Any]]) -> None:
    """Each body is stored once, with every one of its deliveries: no event lost, doubled or half-written."""
    keys = Counter(e.idempotency_key for e in record.events)
    assert keys == Counter(b["idempotency_key"] for b in bodies)
    per_event = Counter(d.event_id for d in record.deliveries)
    expected = {
        e.id: 3 * len(next(b for b in bodies if b["idempotency_key"] == e.idempotency_key)["recipients"])
        for e in record.events
    }
    short = {e: (per_event[e], n) for e, n in expected.items() if per_event[e] != n}
    assert not short, f"events stored without all of their deliveries (have, want): {short}"


def onesignal_key(delivery_id: uuid.UUID) -> str:
    """The idempotency key notifier sends OneSignal for a delivery alone (a UUID derived from its id), or for a
    send group (derived from the group's id: pass it)."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(delivery_id)))


def unit_of(delivery: Delivery) -> uuid.UUID:
    """The id whose key a delivery's provider call carried: its send group's, or its own when it went alone."""
    return delivery.send_group or delivery.id


def assert_exactly_once(
    record: Record,
    providers: Providers,
    *,
    sent_channels: Iterable[str] = ("push", "email", "in_app"),
) -> None:
    """Every delivery is terminal; those on ``sent_channels`` were all sent (none lost); each provider created
    exactly one notification per sent delivery -- one per send group, naming each member once -- and nothing
    else (none doubled)."""
    unfinished = [(d.id, d.channel, d.status) for d in record.deliveries if d.status not in TERMINAL_STATUSES]
    assert not unfinished, f"deliveries left unfinished: {unfinished}"
    lost = [
        (d.user_id, d.channel, d.status, d.reason, d.last_error)
        for d in record.deliveries
        if d.channel in set(sent_channels) and d.status != "sent"
    ]
    assert not lost, f"deliveries that should have been sent were not: {lost}"

    if providers.onesignal is not None:
        sent = record.of("push", "sent")
        created = Counter(str(n.body.get("idempotency_key")) for n in providers.onesignal.notifications)
        units = {onesignal_key(unit_of(d)) for d in sent}
        assert created == Counter(units), "OneSignal notifications != sent pushes (one per delivery or group)"
        per_user = Counter(x for n in providers.onesignal.notifications for x in n.external_ids)
        assert per_user == Counter(d.user_id for d in sent)
        ids = {str(n.body.get("idempotency_key")): n.id for n in providers.onesignal.notifications}
        mismatched = [d.id for d in sent if d.provider_message_id != ids[onesignal_key(unit_of(d))]]
        assert not mismatched, f"recorded provider ids differ from what OneSignal created: {mismatched}"
    if providers.knock is not None:
        sent = record.of("email", "sent")
        runs = Counter(t.idempotency_key for t in providers.knock.triggers)
        assert runs == Counter({str(unit_of(d)) for d in sent}), "Knock workflow runs != sent emails (or groups)"
        named = Counter(user for t in providers.knock.triggers for user in t.recipient_ids)
        assert named == Counter(d.user_id for d in sent), "a sent email's recipient is not in exactly one run"
    if providers.smtp is not None:
        sent = record.of("email", "sent")
        received = Counter(str(m["Message-ID"]) for m in providers.smtp.messages)
        domain = SMTP_FROM.split("@")[1]
        assert received == Counter(f"<{d.id}@{domain}>" for d in sent), "SMTP messages != sent emails"
    sent_in_app = record.of("in_app", "sent")
    stored = Counter(i.delivery_id for i in record.inbox)
    assert stored == Counter(d.id for d in sent_in_app), "inbox items != sent in-app deliveries"
    if providers.ably is not None:
        announced = Counter(
            (m.channel, m.id) for channel in providers.ably.published for m in providers.ably.messages(channel)
        )
        assert announced == Counter((f"notifications:{d.user_id}", str(d.id)) for d in sent_in_app)


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def all_terminal(database_url: str) -> bool:
    """True once there are deliveries and every one of them is terminal (call after every event was answered)."""
    record = await read_record(database_url)
    return bool(record.deliveries) and all(d.status in TERMINAL_STATUSES for d in record.deliveries)


def requests_per_key(fake: OneSignalFake) -> Counter[str]:
    return Counter(str(r.json().get("idempotency_key")) for r in list(fake.requests))


def knock_requests_per_key(fake: KnockFake) -> Counter[str]:
    return Counter(r.headers.get("idempotency-key", "") for r in fake.trigger_requests())


def ably_requests_per_id(fake: AblyFake) -> Counter[str]:
    """Publish requests per message id (the fake is shared by the session: count only this test's ids)."""
    counts: Counter[str] = Counter()
    for r in list(fake.requests):
        if r.method == "POST" and r.path.endswith("/messages"):
            body = r.json()
            counts.update(str(m.get("id")) for m in (body if isinstance(body, list) else [body]))
    return counts


async def post_until_answered(
    client: httpx.AsyncClient,
    url: str,
    body: Mapping[str, Any],
    *,
    deadline: float,
    failures: list[str] | None = None,
) -> httpx.Response:
    """POST an event as a careful producer does: retry 5xx and transport errors with the same idempotency key.

    Each failed try is appended to ``failures`` (status or exception name).
    """
    while True:
        try:
            response = await client.post(url, json=body, headers={"Authorization": f"Bearer {SERVICE_KEY}"}, timeout=10)
            if response.status_code < 500:
                return response
            failed = str(response.status_code)
        except httpx.TransportError as exc:
            failed = type(exc).__name__
        if failures is not None:
            failures.append(failed)
        if time.monotonic() > deadline:
            raise AssertionError(f"event {body.get('idempotency_key')} was never accepted")
        await asyncio.sleep(0.05)
