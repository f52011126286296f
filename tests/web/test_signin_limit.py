"""Dashboard sign-in, rate-limited per client address: real HTTP through the app, the limiter on a hand-moved clock."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from notifier.api.failure_caps import FailureCap, FailureCaps, VouchedAddresses
from notifier.api.signin_limit import SignInLimiter
from notifier.logs import JsonFormatter
from tests.conftest import SERVICE_KEY, Service
from tests.web.conftest import FakeClock

HTML = {"Accept": "text/html,application/xhtml+xml"}
LOCKED_OUT = "Too many failed sign-ins from this address, so this one was not checked."
HERE = "127.0.0.1"  # the address httpx's ASGI transport reports for ``service.client``


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(service: Service, clock: FakeClock) -> SignInLimiter:
    limiter = SignInLimiter(clock=clock)
    service.app.state.signin_limiter = limiter
    return limiter


@contextlib.asynccontextmanager
async def client_from(svc: Service, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests reach the app from ``address`` (what uvicorn puts in ``request.client``)."""
    transport = httpx.ASGITransport(app=svc.app, client=(address, 40_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://notifier.test") as client:
        yield client


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/dashboard/login", data={"key": key, "next": "/dashboard/deliveries"}, headers=HTML)


async def fail(client: httpx.AsyncClient, times: int, clock: FakeClock | None = None, step: float = 0) -> None:
    for n in range(times):
        refused = await sign_in(client, f"wrong-key-{n}-0123456789")
        assert refused.status_code == 401, refused.text
        if clock is not None:
            clock.advance(step)


def assert_locked_out(response: httpx.Response, retry_after: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == str(retry_after)
    assert "set-cookie" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert LOCKED_OUT in response.text
    assert 'aria-invalid="true"' not in response.text  # the key was not judged


async def test_five_failures_then_even_the_right_key_gets_429_unchecked_with_retry_after(
    service: Service, limiter: SignInLimiter, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fail(service.client, 5, clock, step=10)  # failures at 0, 10, 20, 30, 40; now 50
    checked: list[str] = []
    is_service_key = service.runtime.authenticator.is_service_key

    def spy(key: str) -> bool:
        checked.append(key)
        return is_service_key(key)

    monkeypatch.setattr(service.runtime.authenticator, "is_service_key", spy)
    locked = await sign_in(service.client, SERVICE_KEY)
    assert_locked_out(locked, retry_after=250)  # until the failure at 0 is 300 s old
    assert "Try again in 5 minutes." in locked.text
    assert checked == []  # not even compared, so neither the answer nor its timing says anything about the key
    clock.advance(100)
    assert_locked_out(await sign_in(service.client, "wrong-again-0123456789"), retry_after=150)  # not extended
    assert checked == []
    clock.advance(145)
    assert "Try again in 5 seconds." in (await sign_in(service.client, SERVICE_KEY)).text
    assert (await service.client.get("/dashboard", headers=HTML)).status_code == 303  # no session came of it


async def test_the_lockout_ends_as_the_oldest_failure_leaves_the_window(
    service: Service, limiter: SignInLimiter, clock: FakeClock
) -> None:
    await fail(service.client, 5, clock, step=10)  # failures at 0, 10, 20, 30, 40; now 50
    clock.advance(249.5)
    assert_locked_out(await sign_in(service.client, SERVICE_KEY), retry_after=1)
    clock.advance(0.5)  # now 300: the failure at 0 has left the window, four remain
    await fail(service.client, 1)  # the fifth again: locked until the failure at 10 leaves
    assert_locked_out(await sign_in(service.client, SERVICE_KEY), retry_after=10)
    clock.advance(10)
    signed_in = await sign_in(service.client, SERVICE_KEY)
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/dashboard/deliveries"
    assert "notifier_dashboard=" in signed_in.headers["set-cookie"]
    assert (await service.client.get("/dashboard/deliveries", headers=HTML)).status_code == 200


async def test_a_successful_sign_in_clears_the_addresss_failures(service: Service, limiter: SignInLimiter) -> None:
    await fail(service.client, 4)
    assert (await sign_in(service.client, SERVICE_KEY)).status_code == 303
    await fail(service.client, 5)  # five more, each still checked
    assert_locked_out(await sign_in(service.client, SERVICE_KEY), retry_after=300)


async def test_another_address_is_unaffected(service: Service, limiter: SignInLimiter) -> None:
    await fail(service.client, 5)
    async with client_from(service, "203.0.113.7") as other, client_from(service, "2001:db8::1") as third:
        await fail(third, 4)
        signed_in = await sign_in(other, SERVICE_KEY)
        assert signed_in.status_code == 303
        assert "notifier_dashboard=" in signed_in.headers["set-cookie"]
        assert (await sign_in(third, SERVICE_KEY)).status_code == 303
    assert_locked_out(await sign_in(service.client, SERVICE_KEY), retry_after=300)


async def test_memory_is_bounded_oldest_addresses_evicted_and_expired_ones_pruned(
    service: Service, clock: FakeClock
) -> None:
    limiter = service.app.state.signin_limiter = SignInLimiter(max_addresses=3, clock=clock)
    addresses = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"]
    for address in addresses[:3]:
        async with client_from(service, address) as client:
            await fail(client, 5)
            assert_locked_out(await sign_in(client, SERVICE_KEY), retry_after=300)
        clock.advance(1)
    async with client_from(service, addresses[3]) as client:
        await fail(client, 1)  # a fourth address: the one that failed longest ago is forgotten
    assert len(limiter) == 3
    async with client_from(service, addresses[0]) as first, client_from(service, addresses[1]) as second:
        assert (await sign_in(first, SERVICE_KEY)).status_code == 303
        assert (await sign_in(second, SERVICE_KEY)).status_code == 429
    clock.advance(300)
    async with client_from(service, "198.51.100.5") as client:
        await fail(client, 1)
    assert len(limiter) == 1  # the others' failures had all left the window


async def test_one_warning_per_lockout_and_no_key_in_any_log_line_or_response(
    service: Service, limiter: SignInLimiter, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = [f"guess-{n}-{uuid.uuid4().hex}" for n in range(5)]
    responses = [await sign_in(service.client, key) for key in wrong]
    responses += [await sign_in(service.client, key) for key in (SERVICE_KEY, wrong[0], SERVICE_KEY)]
    assert [r.status_code for r in responses] == [401] * 5 + [429] * 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].name == "notifier.dashboard"
    assert warnings[0].getMessage().startswith(f"dashboard sign-in locked for {HERE}: 5 failed attempts within 300 s")
    clock.advance(300)  # the window passes; a fresh run of failures is a new lockout, logged once more
    responses += [await sign_in(service.client, key) for key in [*wrong, SERVICE_KEY]]
    assert [r.status_code for r in responses[8:]] == [401] * 5 + [429]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
    formatter = JsonFormatter()
    logged = [formatter.format(record) + record.getMessage() for record in caplog.records]
    assert logged
    for key in [SERVICE_KEY, *wrong]:
        assert not [line for line in logged if key in line], key
        assert not [r for r in responses if key in r.text + repr(dict(r.headers))], key


# --- the cap on failed sign-ins from all addresses together ------------------------------------------------------

CAPPED = "Too many failed sign-ins from all addresses in the last minute, so this one was not checked."


async def test_failed_sign_ins_from_many_addresses_are_capped_together(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(30):  # the default cap: 30 a minute, one failure from each of 30 addresses
        async with client_from(service, f"198.51.100.{n + 1}") as client:
            await fail(client, 1)
    checked: list[str] = []
    is_service_key = service.runtime.authenticator.is_service_key
    monkeypatch.setattr(
        service.runtime.authenticator, "is_service_key", lambda key: checked.append(key) or is_service_key(key)
    )
    async with client_from(service, "203.0.113.99") as newcomer:
        for key in (SERVICE_KEY, "another-wrong-key-0123456789"):
            capped = await sign_in(newcomer, key)
            assert capped.status_code == 429, capped.text
            assert 55 <= int(capped.headers["retry-after"]) <= 60
            assert CAPPED in capped.text
            assert "set-cookie" not in capped.headers
    assert checked == []  # past the cap the key is not compared at all
    demo = await service.client.post("/inbox-demo", data={"key": SERVICE_KEY, "user_id": "alice"})
    assert demo.status_code == 429  # the inbox demo's sign-in shares the cap
    assert "from all addresses" in demo.text


@pytest.fixture
def caps(service: Service, clock: FakeClock) -> FailureCaps:
    caps = FailureCaps(
        signin=FailureCap(name="failed sign-in", limit=3, clock=clock),
        bearer=FailureCap(name="failed bearer credential", limit=300, clock=clock),
        vouched=VouchedAddresses(clock=clock),
    )
    service.app.state.failure_caps = caps
    return caps


async def test_the_cap_lifts_as_failures_leave_the_minute_and_spares_addresses_that_proved_the_key(
    service: Service, limiter: SignInLimiter, caps: FailureCaps, clock: FakeClock
) -> None:
    async with client_from(service, "192.0.2.10") as operator:
        assert (await sign_in(operator, SERVICE_KEY)).status_code == 303  # the operator's address is vouched for
    for n in range(3):
        async with client_from(service, f"198.51.100.{n + 1}") as client:
            await fail(client, 1)
        clock.advance(10)  # failures at 0, 10, 20; now 30
    async with client_from(service, "203.0.113.5") as newcomer, client_from(service, "192.0.2.10") as operator:
        capped = await sign_in(newcomer, SERVICE_KEY)
        assert capped.status_code == 429
        assert capped.headers["retry-after"] == "30"  # until the failure at 0 is a minute old
        assert (await sign_in(operator, SERVICE_KEY)).status_code == 303  # still checked, and right
        assert (await sign_in(operator, "a-wrong-key-from-the-operator-0123")).status_code == 401  # checked, counted
        clock.advance(30)
        assert (await sign_in(newcomer, SERVICE_KEY)).status_code == 429  # the operator's failure at 30 holds it
        clock.advance(10)
        assert (await sign_in(newcomer, SERVICE_KEY)).status_code == 303
    clock.advance(3600)  # an hour after its last valid key, the operator's address is not vouched for any more
    for n in range(3):
        async with client_from(service, f"198.51.100.{n + 10}") as client:
            await fail(client, 1)
    async with client_from(service, "192.0.2.10") as operator:
        capped = await sign_in(operator, SERVICE_KEY)
        assert capped.status_code == 429
        assert CAPPED in capped.text
