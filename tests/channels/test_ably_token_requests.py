"""Subscribe-only token requests signed by ``AblyRealtime``, exchanged and used against the Ably fake.

The browser side of the inbox component, done here with httpx: post the signed token request to
``token_url``, then open ``sse_url`` with the token. The fake checks requests as Ably does
(tests/fakes/ably.py), so these also pin what the fake refuses.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from notifier.channels.ably import AblyRealtime
from tests.fakes.ably import AblyFake, ably_mac

TTL = dt.timedelta(minutes=15)


@pytest.fixture
async def ably(ably_fake: AblyFake) -> AsyncIterator[AblyRealtime]:
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=2)
    yield realtime
    await realtime.aclose()


@pytest.fixture
async def browser(ably_fake: AblyFake) -> AsyncIterator[httpx.AsyncClient]:
    # SSL_CERT_FILE (set by ably_fake) makes httpx trust the fake, as it does for the SDK.
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


async def signed(ably: AblyRealtime, user: str = "alice") -> dict[str, Any]:
    return await ably.subscribe_token_request(channel_name=f"notifications:{user}", client_id=user, ttl=TTL)


async def exchange(browser: httpx.AsyncClient, ably: AblyRealtime, request: dict[str, Any]) -> httpx.Response:
    return await browser.post(ably.token_url, json=request)


async def test_the_token_request_is_signed_locally_for_one_channel(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    before = int(time.time() * 1000)
    request = await signed(ably)
    assert ably_fake.requests == []  # signed with the key here: no call to Ably
    assert set(request) == {"keyName", "ttl", "capability", "clientId", "timestamp", "nonce", "mac"}
    assert request["keyName"] == "fakeapp.fakekey"
    assert json.loads(request["capability"]) == {"notifications:alice": ["subscribe"]}
    assert request["clientId"] == "alice"
    assert request["ttl"] == 15 * 60 * 1000
    assert before <= request["timestamp"] <= int(time.time() * 1000)
    assert len(request["nonce"]) >= 16
    assert request["mac"] == ably_mac("fake-key-secret-0123456789", request)
    assert "fake-key-secret" not in json.dumps(request)
    assert ably.token_url == f"{ably_fake.url}/keys/fakeapp.fakekey/requestToken"
    assert ably.sse_url("notifications:alice") == f"{ably_fake.url}/sse?v=1.2&channels=notifications%3Aalice"


def test_without_an_override_the_browser_goes_to_ablys_own_host() -> None:
    realtime = AblyRealtime(api_key="app.key:secret-value", rest_url=None, timeout=1)
    assert realtime.token_url == "https://main.realtime.ably.net/keys/app.key/requestToken"
    assert (
        realtime.sse_url("notifications:a b")
        == "https://main.realtime.ably.net/sse?v=1.2&channels=notifications%3Aa%20b"
    )


async def test_the_exchanged_token_can_only_subscribe_to_that_channel(
    ably: AblyRealtime, ably_fake: AblyFake, browser: httpx.AsyncClient
) -> None:
    issued = await exchange(browser, ably, await signed(ably))
    assert issued.status_code == 201
    token = issued.json()
    assert json.loads(token["capability"]) == {"notifications:alice": ["subscribe"]}
    assert token["clientId"] == "alice"
    assert abs(token["expires"] - token["issued"] - 15 * 60 * 1000) < 1000

    other = await browser.get(ably.sse_url("notifications:bob") + f"&accessToken={token['token']}")
    assert other.status_code == 401
    assert other.json()["error"]["code"] == 40160
    both = ably.sse_url("notifications:alice") + ",notifications:bob"
    assert (await browser.get(f"{both}&accessToken={token['token']}")).json()["error"]["code"] == 40160
    publish = await browser.post(
        f"{ably_fake.url}/channels/notifications:alice/messages",
        json={"name": "x", "data": "y"},
        headers={"Authorization": "Bearer " + base64.b64encode(token["token"].encode()).decode()},
    )
    assert publish.status_code == 401  # subscribe only: it cannot announce anything itself


async def test_a_stream_delivers_what_is_published_and_ends_when_the_token_expires(
    ably: AblyRealtime, ably_fake: AblyFake, browser: httpx.AsyncClient
) -> None:
    token = (await exchange(browser, ably, await signed(ably))).json()["token"]
    url = ably.sse_url("notifications:alice") + f"&accessToken={token}"
    headers = {"Accept": "text/event-stream", "Origin": "http://app.example.com"}
    async with browser.stream("GET", url, headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["access-control-allow-origin"] == "*"
        lines = (line async for line in stream.aiter_lines() if line)  # events are separated by blank lines
        assert await anext(lines) == ":keepalive"
        result = await ably.publish(channel_name="notifications:alice", name="booking.confirmed", message_id="d-1",
                                    data={"id": "m-1", "title": "Hello"})  # fmt: skip
        assert result.outcome.value == "sent"
        event = [await anext(lines) for _ in range(3)]
        assert event[0].startswith("id: fake-")
        assert event[1] == "event: message"
        message = json.loads(event[2].removeprefix("data: "))
        assert (message["name"], message["id"], message["encoding"]) == ("booking.confirmed", "d-1", "json")
        assert json.loads(message["data"]) == {"id": "m-1", "title": "Hello"}

        ably_fake.expire_tokens()
        rest = [line async for line in lines]
        assert rest[0] == "event: error"
        assert json.loads(rest[1].removeprefix("data: "))["code"] == 40142
    expired = await browser.get(url)
    assert (expired.status_code, expired.json()["error"]["code"]) == (401, 40142)


async def test_a_stream_resumes_after_its_last_event(
    ably: AblyRealtime, ably_fake: AblyFake, browser: httpx.AsyncClient
) -> None:
    for n in range(3):
        await ably.publish(channel_name="notifications:alice", name="t", message_id=f"d-{n}", data={"n": n})
    first = ably_fake.messages("notifications:alice")[0].serial
    token = (await exchange(browser, ably, await signed(ably))).json()["token"]
    url = ably.sse_url("notifications:alice") + f"&accessToken={token}&lastEvent={first}"
    async with browser.stream("GET", url) as stream:
        lines = stream.aiter_lines()
        data: list[Any] = []
        while len(data) < 2:
            line = await asyncio.wait_for(anext(lines), 5)
            if line.startswith("data: "):
                data.append(json.loads(json.loads(line.removeprefix("data: "))["data"]))
    assert data == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"capability": '{"*":["subscribe"]}'}, 40101),  # widened after signing: the mac no longer matches
        ({"clientId": "bob"}, 40101),
        ({"ttl": 86_400_000}, 40101),
        ({"timestamp": "stale"}, 40104),
        ({"mac": None}, 40101),  # unsigned, and no Basic auth
    ],
)
async def test_a_tampered_or_stale_token_request_is_refused(
    ably: AblyRealtime, browser: httpx.AsyncClient, change: dict[str, Any], code: int
) -> None:
    request = await signed(ably)
    if change.get("timestamp") == "stale":
        request["timestamp"] -= 3 * 60 * 1000
        request["mac"] = ably_mac("fake-key-secret-0123456789", request)  # correctly signed, but too old
    elif "mac" in change:
        del request["mac"]
    else:
        request.update(change)
    answer = await exchange(browser, ably, request)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == code


async def test_a_token_request_is_good_once(ably: AblyRealtime, browser: httpx.AsyncClient) -> None:
    request = await signed(ably)
    assert (await exchange(browser, ably, request)).status_code == 201
    again = await exchange(browser, ably, request)
    assert (again.status_code, again.json()["error"]["code"]) == (401, 40105)


async def test_the_token_endpoint_answers_cross_origin_preflights(
    ably: AblyRealtime, browser: httpx.AsyncClient
) -> None:
    preflight = await browser.options(
        ably.token_url,
        headers={
            "Origin": "http://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
