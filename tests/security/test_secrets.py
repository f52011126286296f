"""Secrets never leave the service: not in responses, not in logs, whatever callers send or providers answer."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import jwt
import pytest

from notifier.channels.ably import AblyRealtime
from notifier.channels.base import Message, Recipient, SendResult
from notifier.channels.edge import PROVIDER_REPLY_LIMIT
from notifier.channels.knock import KnockEmail
from notifier.channels.onesignal import OneSignalPush
from notifier.logs import JsonFormatter
from notifier.types import ChannelName
from tests.conftest import SERVICE_KEY, make_settings, running_service, user_token
from tests.fakes.ably import AblyFake, ably_error
from tests.fakes.base import Fault, make_self_signed_cert
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake
from tests.reliability.faults import ably_key_of, first, in_front_of, knock_key_of, onesignal_key_of
from tests.reliability.ledger import payment_event

SECOND_KEY = "second-service-key-" + uuid.uuid4().hex
JWT_SECRET = "user-jwt-secret-" + uuid.uuid4().hex
QSTASH_TOKEN = "qstash-token-" + uuid.uuid4().hex
QSTASH_CURRENT = "sig_current_" + uuid.uuid4().hex
QSTASH_NEXT = "sig_next_" + uuid.uuid4().hex
DB_PASSWORD = "db-password-" + uuid.uuid4().hex
NOISY = ("httpx", "httpcore", "aiosqlite", "asyncio", "ably", "urllib3", "knockapi")  # as configure_logging does


def with_password(url: str) -> str:
    # The shared test cluster trusts loopback, so the password is carried but never checked.
    return url.replace("postgresql+asyncpg://postgres@", f"postgresql+asyncpg://postgres:{DB_PASSWORD}@", 1)


async def test_no_secret_reaches_a_response_or_a_log_line(
    database_url: str,
    onesignal_fake: OneSignalFake,
    knock_fake: KnockFake,
    ably_fake: AblyFake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in NOISY:
        caplog.set_level(logging.WARNING, logger=name)
    ably_secret = ably_fake.api_key.split(":")[1]
    secrets = {
        "service key": SERVICE_KEY,
        "second service key": SECOND_KEY,
        "user JWT secret": JWT_SECRET,
        "OneSignal key": onesignal_fake.api_key,
        "Knock key": knock_fake.api_key,
        "Ably key secret": ably_secret,
        "QStash token": QSTASH_TOKEN,
        "QStash current signing key": QSTASH_CURRENT,
        "QStash next signing key": QSTASH_NEXT,
        "database password": DB_PASSWORD,
    }
    # Providers that echo the credential they were given in their error replies (first try of every delivery).
    tls = make_self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    echo_push = first(1, Fault.http(503, {"errors": [f"Key {onesignal_fake.api_key} is over quota"]}))
    echo_knock = first(1, Fault.http(503, {"message": f"api key {knock_fake.api_key} throttled"}))
    echo_ably = first(1, ably_error(503, 50300, f"key {ably_fake.api_key} unavailable"))
    with (
        in_front_of(onesignal_fake.app, onesignal_key_of, echo_push) as (push_url, _),
        in_front_of(knock_fake.app, knock_key_of, echo_knock) as (knock_url, _),
        in_front_of(ably_fake.app, ably_key_of, echo_ably, tls=tls) as (ably_url, _),
    ):
        settings = make_settings(
            with_password(database_url),
            api_keys=f"{SERVICE_KEY},{SECOND_KEY}",
            user_jwt_secret=JWT_SECRET,
            dispatcher="local",
            qstash_token=QSTASH_TOKEN,
            qstash_current_signing_key=QSTASH_CURRENT,
            qstash_next_signing_key=QSTASH_NEXT,
            onesignal_app_id=onesignal_fake.app_id,
            onesignal_rest_api_key=onesignal_fake.api_key,
            onesignal_api_url=push_url,
            knock_api_key=knock_fake.api_key,
            knock_base_url=knock_url,
            ably_api_key=ably_fake.api_key,
            ably_rest_url=ably_url,
            retry_backoff_scale=0.0002,
        )
        assert not any(value in repr(settings) for value in secrets.values())
        responses: list[httpx.Response] = []
        async with running_service(settings) as svc:
            client = svc.client
            accepted = await svc.post_event(payment_event("secret-run", "u-1", "u-2"))
            assert accepted.status_code == 202, accepted.text
            responses.append(accepted)
            await svc.drain(20)
            expired = jwt.encode({"sub": "u-1", "exp": int(time.time()) - 60}, JWT_SECRET, algorithm="HS256")
            forged = jwt.encode({"sub": "u-1", "exp": int(time.time()) + 60}, "not-the-secret-" * 3, "HS256")
            wrong_url = jwt.encode(
                {"iss": "Upstash", "sub": "http://elsewhere/", "exp": int(time.time()) + 60, "nbf": 0, "body": ""},
                QSTASH_CURRENT,
                algorithm="HS256",
            )
            for headers in (
                {"Authorization": f"Bearer {SERVICE_KEY}x"},
                {"Authorization": f"Bearer {SERVICE_KEY[:-1]}"},
                {"Authorization": f"Basic {SERVICE_KEY}"},
                {"Authorization": f"Bearer {expired}"},
                {"Authorization": f"Bearer {forged}"},
                {"Authorization": f"Bearer {user_token('u-1', secret=JWT_SECRET)}"},  # valid, but not for /v1/events
                {"Upstash-Signature": "not-a-jwt"},
                {"Upstash-Signature": wrong_url},
            ):
                refused = await client.post("/v1/events", json=payment_event("x", "u-1"), headers=headers)
                assert refused.status_code in (401, 403), refused.text
                responses.append(refused)
            responses.append(await client.post("/v1/qstash/deliveries/x", headers={"Upstash-Signature": wrong_url}))
            for path in ("/readyz", "/metrics", "/openapi.json", "/docs", "/v1/event-types", "/v1/deliveries"):
                responses.append(await svc.get(path))
            responses.append(await svc.get(f"/v1/events/{accepted.json()['event_id']}"))
            for delivery in accepted.json()["deliveries"]:
                detail = await svc.get(f"/v1/deliveries/{delivery['id']}")
                assert detail.json()["status"] == "sent", detail.text
                assert detail.json()["attempts"][0]["outcome"] == "retry"  # the echoing reply was recorded...
                responses.append(detail)
            token = user_token("u-1", secret=JWT_SECRET)
            responses.append(await client.get("/v1/users/u-1/inbox", headers={"Authorization": f"Bearer {token}"}))
            responses.append(await client.get(f"/preferences?token={token}"))
    leaks: list[tuple[str, str]] = []
    for response in responses:
        text = response.text + repr(dict(response.headers))
        leaks += [
            (name, f"{response.request.method} {response.request.url.path}")
            for name, value in secrets.items()
            if value in text
        ]
    formatter = JsonFormatter()
    for record in caplog.records:
        text = (
            formatter.format(record)
            + record.getMessage()
            + (formatter.formatException(record.exc_info) if record.exc_info else "")
        )
        leaks += [
            (name, f"log {record.name}: {record.getMessage()[:80]}") for name, value in secrets.items() if value in text
        ]
    assert not leaks, f"secrets leaked: {leaks}"
    assert caplog.records, "nothing was logged: the test proved nothing"


def _straddling(secret: str, offset: int) -> str:
    """A provider message that puts ``secret`` across character 500 of a detail whose message starts at ``offset``."""
    padding = PROVIDER_REPLY_LIMIT - len(secret) // 2 - offset
    assert padding > 0, offset
    return "p" * padding + secret + "q" * 600


@pytest.mark.parametrize("provider", ["onesignal", "knock", "ably"])
async def test_a_key_across_the_truncation_point_leaves_no_prefix_behind(
    provider: str, onesignal_fake: OneSignalFake, knock_fake: KnockFake, ably_fake: AblyFake
) -> None:
    # finish() redacts, then truncates: cut first, the key's first half would no longer match and stay behind.
    message = Message(
        delivery_id=uuid.uuid4(),
        event_id=uuid.uuid4(),
        event_type="booking.confirmed",
        channel=ChannelName.push,
        recipient=Recipient("user-1", "u1@example.com"),
        title="Booking confirmed",
        body="See you Friday.",
    )
    send: Callable[[], Awaitable[SendResult]]
    if provider == "onesignal":
        push = OneSignalPush(
            app_id=onesignal_fake.app_id, api_key=onesignal_fake.api_key, api_url=onesignal_fake.url, timeout=2.0
        )
        secret, send, closing = onesignal_fake.api_key, lambda: push.send(message), push.aclose

        def fail(text: str) -> None:
            onesignal_fake.fail_next(Fault.http(400, {"errors": [text]}))
    elif provider == "knock":
        knock = KnockEmail(api_key=knock_fake.api_key, base_url=knock_fake.url, workflow_prefix="", timeout=2.0)
        secret, send, closing = knock_fake.api_key, lambda: knock.send(message), knock.aclose

        def fail(text: str) -> None:
            knock_fake.fail_next(Fault.http(400, {"message": text}))
    else:
        ably = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=2.0)
        secret = ably_fake.api_key.split(":", 1)[1]

        def send() -> Awaitable[SendResult]:
            return ably.publish(channel_name="notifications:user-1", name="n", message_id="d-1", data={"a": 1})

        closing = ably.aclose

        def fail(text: str) -> None:
            ably_fake.fail_next(ably_error(400, 40000, text))

    try:
        fail("MARK" + "z" * 40)
        probe = (await send()).detail
        fail(_straddling(secret, probe.index("MARK")))
        detail = (await send()).detail
    finally:
        await closing()
    assert len(detail) == PROVIDER_REPLY_LIMIT
    assert "[redacted]" in detail
    assert secret[:8] not in detail, detail[-60:]
