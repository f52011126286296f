"""The cap on failed bearer credentials from all addresses together: past it, a credential from an address not
vouched for by a recent valid one is answered 429 without being checked, and valid credentials keep working
from where they were used before. In-process, SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from notifier.api.failure_caps import FailureCap, FailureCaps, VouchedAddresses
from tests.conftest import SERVICE_KEY, Service, user_token
from tests.web.conftest import FakeClock

ServiceFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]
PRODUCER, ALICE, GUESSER, NEWCOMER = "192.0.2.10", "192.0.2.20", "198.51.100.7", "203.0.113.5"
WRONG = "not-the-service-key-0123456789-abcdef"
EVENTS, INBOX = "/v1/events?limit=1", "/v1/users/alice/inbox"


@contextlib.asynccontextmanager
async def client_from(svc: Service, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests reach the app from ``address`` (what uvicorn puts in ``request.client``)."""
    transport = httpx.ASGITransport(app=svc.app, client=(address, 40_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://notifier.test") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def guess(svc: Service, address: str, times: int, path: str = EVENTS) -> list[int]:
    async with client_from(svc, address) as client:
        return [(await client.get(path, headers=bearer(f"{WRONG}-{n}"))).status_code for n in range(times)]


async def test_past_the_cap_wrong_keys_get_429_unchecked_and_known_clients_keep_working(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with service_factory(bearer_failures_per_minute=20) as svc:
        async with client_from(svc, PRODUCER) as producer, client_from(svc, ALICE) as alice:
            assert (await producer.get(EVENTS, headers=bearer(SERVICE_KEY))).status_code == 200
            assert (await alice.get(INBOX, headers=bearer(user_token("alice")))).status_code == 200
        assert await guess(svc, GUESSER, 12) + await guess(svc, NEWCOMER, 8) == [401] * 20

        checked: list[Any] = []
        authenticate = svc.runtime.authenticator.authenticate
        monkeypatch.setattr(
            svc.runtime.authenticator, "authenticate", lambda *a, **k: checked.append(a) or authenticate(*a, **k)
        )
        for address in (GUESSER, NEWCOMER):
            async with client_from(svc, address) as client:
                capped = await client.get(EVENTS, headers=bearer(WRONG))
                assert capped.status_code == 429
                assert capped.headers["content-type"] == "application/problem+json"
                assert 55 <= int(capped.headers["retry-after"]) <= 60
                assert "not checked" in capped.json()["detail"]
                # The answer does not depend on the credential: the right key from here is not checked either.
                assert (await client.get(EVENTS, headers=bearer(SERVICE_KEY))).status_code == 429
        assert checked == []

        async with client_from(svc, PRODUCER) as producer, client_from(svc, ALICE) as alice:
            assert (await producer.get(EVENTS, headers=bearer(SERVICE_KEY))).status_code == 200
            assert (await producer.get(EVENTS, headers=bearer(WRONG))).status_code == 401  # still checked
            assert (await alice.get(INBOX, headers=bearer(user_token("alice")))).status_code == 200
            # A valid user token vouches for user tokens only: a service-key guess from alice's address waits.
            assert (await alice.get(EVENTS, headers=bearer(WRONG))).status_code == 429
            assert (await alice.get(EVENTS, headers=bearer(SERVICE_KEY))).status_code == 429
        async with client_from(svc, NEWCOMER) as newcomer:
            assert (await newcomer.get(EVENTS)).status_code == 401  # no credential: nothing to guess, plain 401


async def test_requests_without_a_credential_are_not_counted(service_factory: ServiceFactory) -> None:
    async with service_factory(bearer_failures_per_minute=5) as svc, client_from(svc, GUESSER) as client:
        for headers in ({}, {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, {"Authorization": "Bearer "}) * 10:
            assert (await client.get(EVENTS, headers=headers)).status_code == 401
        assert (await client.get(EVENTS, headers=bearer(SERVICE_KEY))).status_code == 200


async def test_the_cap_slides_with_the_minute_and_logs_once_without_a_credential(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    service.app.state.failure_caps = FailureCaps(
        signin=FailureCap(name="failed sign-in", limit=30, clock=clock),
        bearer=FailureCap(name="failed bearer credential", limit=3, clock=clock),
        vouched=VouchedAddresses(clock=clock),
    )
    caplog.set_level(logging.INFO)
    for n in range(3):
        clock.advance(20 if n else 0)
        assert await guess(service, f"198.51.100.{n + 1}", 1) == [401]  # failures at 0, 20, 40; now 40
    async with client_from(service, NEWCOMER) as newcomer:
        capped = await newcomer.get(EVENTS, headers=bearer(SERVICE_KEY))
        assert (capped.status_code, capped.headers["retry-after"]) == (429, "20")
        clock.advance(20)  # the failure at 0 leaves the window: one more is checked
        assert (await newcomer.get(EVENTS, headers=bearer(SERVICE_KEY))).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("failed bearer credential cap reached: 3 failures within 60 s from all addresses")
    for record in caplog.records:
        assert WRONG not in record.getMessage()
        assert SERVICE_KEY not in record.getMessage()


def test_memory_is_bounded() -> None:
    clock = FakeClock()
    cap = FailureCap(name="test", limit=3, clock=clock)
    for _ in range(1000):
        cap.record_failure()
    assert len(cap) == 3
    vouched = VouchedAddresses(max_addresses=2, ttl=100, clock=clock)
    for n in range(5):
        vouched.vouch("service", f"192.0.2.{n}")
        vouched.vouch("user", f"198.51.100.{n}")
    assert len(vouched) == 4  # two per kind, the most recent
    assert vouched.vouched("service", "192.0.2.4")
    assert not vouched.vouched("service", "192.0.2.0")
    clock.advance(100)
    assert not vouched.vouched("service", "192.0.2.4")  # an hour (here: ttl) after its last valid credential
