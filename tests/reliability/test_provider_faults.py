"""Provider faults end to end: POST /v1/events → local dispatcher → real SDKs → loopback fakes that misbehave.

Each fault is scripted per idempotency key (a delivery's, or its send group's: each event here goes to two
users, so its push and its email are one call each; see ``faults.py``) in front of the fakes, which dedupe by
idempotency key as the real providers do. After each storm every delivery is terminal and each provider
created exactly one notification per sent delivery (per group): retries reuse the key, so at-least-once
transport has an exactly-once effect.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from notifier.config import Settings
from tests.conftest import Service, make_settings, running_service
from tests.fakes.ably import AblyFake, ably_error
from tests.fakes.base import Fault, make_self_signed_cert, refused_url, serve
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.smtp import SmtpServer
from tests.reliability.faults import (
    Late,
    PerMessage,
    ably_key_of,
    any_status,
    first,
    in_front_of,
    knock_key_of,
    onesignal_key_of,
)
from tests.reliability.ledger import (
    Providers,
    assert_exactly_once,
    eventually,
    payment_event,
    read_record,
    unit_of,
)

USERS = [f"u-{i}" for i in range(6)]


def fault_settings(database_url: str, providers: Providers, **overrides: Any) -> Settings:
    # The retry schedule compressed 5000-fold: retries after 2.4 ms, 30 ms, 0.36 s, 4.4 s, 54 s.
    values: dict[str, Any] = {"workers": 8, "max_retries": 5, "retry_backoff_scale": 0.0002}
    return make_settings(database_url, **(values | providers.settings() | overrides))


async def post_payments(svc: Service, users: list[str]) -> dict[str, list[uuid.UUID]]:
    """One payment event per pair of users; return the delivery ids by channel."""
    ids: dict[str, list[uuid.UUID]] = {"push": [], "email": [], "in_app": []}
    for n in range(0, len(users), 2):
        response = await svc.post_event(payment_event(f"pay-{n}", *users[n : n + 2]))
        assert response.status_code == 202, response.text
        for d in response.json()["deliveries"]:
            ids[d["channel"]].append(uuid.UUID(d["id"]))
    return ids


def outcomes(record: Any, delivery_ids: list[uuid.UUID]) -> set[tuple[str | None, ...]]:
    return {tuple(a.outcome for a in record.attempts_of(i)) for i in delivery_ids}


async def test_a_5xx_storm_on_every_provider_ends_with_one_notification_per_delivery(
    database_url: str,
    onesignal_fake: OneSignalFake,
    knock_fake: KnockFake,
    ably_fake: AblyFake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls = make_self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    storm = first(3, any_status([500, 502, 503, 504]))
    announcements = PerMessage(3, ably_error(503, 50300))
    with (
        in_front_of(onesignal_fake.app, onesignal_key_of, storm) as (push_url, push_faults),
        in_front_of(knock_fake.app, knock_key_of, storm) as (knock_url, knock_faults),
        in_front_of(ably_fake.app, ably_key_of, announcements, tls=tls) as (ably_url, _),
    ):
        providers = Providers(onesignal=onesignal_fake, knock=knock_fake, ably=ably_fake)
        settings = fault_settings(
            database_url, providers, onesignal_api_url=push_url, knock_base_url=knock_url, ably_rest_url=ably_url
        )
        async with running_service(settings) as svc:
            ids = await post_payments(svc, USERS)
            await svc.drain(20)
    record = await read_record(database_url)
    assert_exactly_once(record, providers)
    # every push and email met the storm three times, and the fourth attempt went through
    for channel in ("push", "email"):
        assert outcomes(record, ids[channel]) == {("retry", "retry", "retry", "sent")}, channel
    # every announcement was refused as often as the batches that carried it were (three times, unless a batch
    # of attempts running beside it carried it past the storm sooner), then went through
    for delivery_id in ids["in_app"]:
        met = announcements.refused[str(delivery_id)]
        assert 1 <= met <= 3
        assert outcomes(record, [delivery_id]) == {("retry",) * met + ("sent",)}
    assert max(announcements.refused.values()) == 3
    calls = len(USERS) // 2  # one push and one email call per event (a send group of two)
    assert len({unit_of(d) for d in record.of("push")}) == len({unit_of(d) for d in record.of("email")}) == calls
    assert sum(push_faults.faulted.values()) == sum(knock_faults.faulted.values()) == 3 * calls
    # the in-app item was stored once however often its Ably announcement was retried
    assert len(record.inbox) == len(USERS)


async def test_429_retry_after_is_honoured_and_nothing_is_doubled(
    database_url: str, onesignal_fake: OneSignalFake, knock_fake: KnockFake
) -> None:
    knock_429 = Fault(status=429, body={"code": "rate_limited"}, headers={"retry-after-ms": "800"})
    with (
        in_front_of(onesignal_fake.app, onesignal_key_of, first(1, Fault.rate_limited(retry_after=1))) as (push, _),
        in_front_of(knock_fake.app, knock_key_of, first(1, knock_429)) as (knock, _),
    ):
        providers = Providers(onesignal=onesignal_fake, knock=knock_fake)
        settings = fault_settings(database_url, providers, onesignal_api_url=push, knock_base_url=knock)
        async with running_service(settings) as svc:
            ids = await post_payments(svc, USERS)
            await svc.drain(20)
    record = await read_record(database_url)
    assert_exactly_once(record, providers)
    for channel, wait in (("push", 1.0), ("email", 0.8)):
        for delivery_id in ids[channel]:
            first_attempt, second = record.attempts_of(delivery_id)
            assert (first_attempt.outcome, first_attempt.http_status, second.outcome) == ("retry", 429, "sent")
            assert first_attempt.finished_at is not None
            # the schedule alone would have retried after 2.4 ms; the provider's Retry-After won
            assert (second.started_at - first_attempt.finished_at).total_seconds() >= wait - 0.05


@pytest.mark.parametrize("fault", ["hang-before-accepting", "reply-lost-after-accepting"])
async def test_a_provider_hanging_past_the_timeout_is_retried_with_the_same_key(
    database_url: str, onesignal_fake: OneSignalFake, knock_fake: KnockFake, fault: str
) -> None:
    # reply-lost: the provider creates the notification, then answers after our timeout (twice per key)
    timeouts = 1 if fault == "hang-before-accepting" else 2
    push_script = first(1, Fault.hang(1.5)) if fault == "hang-before-accepting" else first(2, Late(1.5))
    with (
        in_front_of(onesignal_fake.app, onesignal_key_of, push_script) as (push, push_faults),
        in_front_of(knock_fake.app, knock_key_of, first(1, Fault.hang(1.5))) as (knock, _),
    ):
        providers = Providers(onesignal=onesignal_fake, knock=knock_fake)
        settings = fault_settings(
            database_url, providers, onesignal_api_url=push, knock_base_url=knock, provider_timeout_seconds=0.5
        )
        async with running_service(settings) as svc:
            ids = await post_payments(svc, USERS)
            await svc.drain(20)
    record = await read_record(database_url)
    assert_exactly_once(record, providers)
    # each delivery timed out as often as scripted (a slow machine may add one), then was sent
    for channel, scripted in (("push", timeouts), ("email", 1)):
        for attempts in outcomes(record, ids[channel]):
            assert attempts[-1] == "sent"
            assert set(attempts[:-1]) == {"retry"}
            assert len(attempts) - 1 >= scripted
    errors = {a.error for i in ids["push"] + ids["email"] for a in record.attempts_of(i) if a.outcome == "retry"}
    assert all("time" in (e or "").lower() for e in errors), errors
    if fault == "reply-lost-after-accepting":
        # the first request created the notification; both retries were answered from OneSignal's key store
        assert min(push_faults.seen.values()) >= 3
        assert len(onesignal_fake.notifications) == len(USERS) // 2  # one per event's send group


async def test_refused_connections_are_retried_until_the_provider_is_reachable(database_url: str) -> None:
    onesignal = OneSignalFake(app_id=str(uuid.uuid4()), api_key=f"os_v2_app_{uuid.uuid4().hex}")
    nobody = refused_url()  # nothing listens here yet: connection refused
    smtp = SmtpServer()  # bound to a free port, not started: connection refused
    providers = Providers(onesignal=onesignal, smtp=smtp, onesignal_url=nobody)
    async with running_service(fault_settings(database_url, providers)) as svc:
        ids = await post_payments(svc, USERS)

        async def every_delivery_refused() -> bool:
            record = await read_record(database_url)
            return all(any(a.outcome == "retry" for a in record.attempts_of(i)) for i in ids["push"] + ids["email"])

        await eventually(every_delivery_refused, timeout=20, what="every push and email to be refused")
        record = await read_record(database_url)
        errors = {a.error for i in ids["push"] + ids["email"] for a in record.attempts_of(i) if a.error}
        assert errors
        assert all("connect" in e.lower() for e in errors), errors
        # now the providers come up on the very addresses notifier was refused at
        with serve(onesignal.app, port=urlsplit(nobody).port):
            smtp.start()
            try:
                await svc.drain(20)
            finally:
                smtp.stop()
    record = await read_record(database_url)
    assert_exactly_once(record, providers)
