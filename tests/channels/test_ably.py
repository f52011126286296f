"""AblyRealtime driven through the real ``ably`` SDK against the TLS loopback fake (tests/fakes/ably.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from ably import AblyRest
from ably.util.exceptions import AblyAuthException, AblyException

from notifier.channels.ably import AblyRealtime, classify, client_options
from notifier.channels.base import Outcome, PresenceUnavailable
from notifier.config import Settings
from notifier.types import Reason
from tests.fakes.ably import ENTER, LEAVE, PRESENT, UPDATE, AblyFake, ably_error
from tests.fakes.base import Fault, refused_url

ITEM = {"id": "inbox-1", "title": "New comment", "body": "Ann replied", "read": False, "tags": ["a", "b"]}


def refused_https_url() -> str:
    return refused_url().replace("http://", "https://")


@pytest.fixture
async def ably(ably_fake: AblyFake) -> AsyncIterator[AblyRealtime]:
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=0.5)
    yield realtime
    await realtime.aclose()


async def publish(realtime: AblyRealtime, message_id: str = "delivery-1", channel: str = "notifications:user-1") -> Any:
    return await realtime.publish(channel_name=channel, name="comment.created", message_id=message_id, data=ITEM)


# --- the request ----------------------------------------------------------------------------------


async def test_publish_sends_the_exact_request(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    result = await publish(ably)

    assert result.outcome is Outcome.sent
    assert result.provider_message_id == "delivery-1"
    assert result.detail == "serial fake-000001@notifications:user-1"
    [request] = ably_fake.requests
    assert request.method == "POST"
    assert request.path == "/channels/notifications:user-1/messages"
    assert ably_fake.raw_paths == ["/channels/notifications:user-1/messages"]  # publish does not encode ":"
    assert request.headers["authorization"] == "Basic " + base64.b64encode(ably_fake.api_key.encode()).decode()
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body["name"] == "comment.created"
    assert body["id"] == "delivery-1"
    assert body["encoding"] == "json"
    assert json.loads(body["data"]) == ITEM
    [published] = ably_fake.messages("notifications:user-1")
    assert (published.name, published.id, published.data) == ("comment.created", "delivery-1", ITEM)


async def test_same_message_id_twice_is_published_once(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    first = await publish(ably, "delivery-1")
    again = await publish(ably, "delivery-1")  # a retry of the same delivery
    other = await publish(ably, "delivery-2")

    assert [r.outcome for r in (first, again, other)] == [Outcome.sent] * 3
    assert again.provider_message_id == first.provider_message_id == "delivery-1"
    assert len(ably_fake.requests) == 3
    assert [m.id for m in ably_fake.messages("notifications:user-1")] == ["delivery-1", "delivery-2"]


async def test_wrong_key_is_rejected_by_the_fake(ably_fake: AblyFake) -> None:
    realtime = AblyRealtime(api_key="fakeapp.fakekey:not-the-secret", rest_url=ably_fake.url, timeout=2)
    try:
        result = await publish(realtime)
    finally:
        await realtime.aclose()
    assert (result.outcome, result.reason, result.http_status) == (Outcome.failed, Reason.rejected, 401)
    assert "40101" in result.detail
    assert ably_fake.messages("notifications:user-1") == []


async def test_token_error_makes_the_sdk_switch_to_a_token_and_resend_once(
    ably: AblyRealtime, ably_fake: AblyFake
) -> None:
    ably_fake.fail_next(ably_error(401, 40140, "Token expired"))

    result = await publish(ably)

    assert result.outcome is Outcome.sent
    assert [(r.method, r.path) for r in ably_fake.requests] == [
        ("POST", "/channels/notifications:user-1/messages"),
        ("POST", "/keys/fakeapp.fakekey/requestToken"),
        ("POST", "/channels/notifications:user-1/messages"),
    ]
    assert ably_fake.requests[2].headers["authorization"] == "Bearer " + base64.b64encode(b"fake-token-1").decode()
    assert ably_fake.requests[0].json()["id"] == ably_fake.requests[2].json()["id"] == "delivery-1"


async def test_certificate_is_trusted_only_through_ssl_cert_file(
    ably_fake: AblyFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=2)
    try:
        result = await publish(realtime)
    finally:
        await realtime.aclose()
    assert result.outcome is Outcome.retry
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert ably_fake.requests == []


# --- provider reply -> SendResult -------------------------------------------------------------------

HTML_503 = Fault(503, "<html>down</html>", {"content-type": "text/html"})
REPLIES = [
    # id, fault (None: the fake's normal 201), outcome, reason, http_status, words in detail
    ("201", None, Outcome.sent, None, None, "serial fake-"),
    ("400/40003", ably_error(400, 40003), Outcome.failed, Reason.rejected, 400, "ably 400/40003"),
    ("401/40101", ably_error(401, 40101), Outcome.failed, Reason.rejected, 401, "ably 401/40101"),
    ("403/40171", ably_error(403, 40171), Outcome.failed, Reason.rejected, 403, "ably 403/40171"),
    ("404", ably_error(404, 40400), Outcome.failed, Reason.rejected, 404, "ably 404/40400"),
    ("429/42910", ably_error(429, 42910), Outcome.retry, None, 429, "ably 429/42910"),
    ("500", ably_error(500, 50000), Outcome.retry, None, 500, "ably 500/50000"),
    ("html 503", HTML_503, Outcome.retry, None, 503, "<html>down"),
    ("hang", Fault.hang(2.0), Outcome.retry, None, None, "ReadTimeout"),
    ("refused", "refused", Outcome.retry, None, None, "connection failed"),
]


@pytest.mark.parametrize(
    ("fault", "outcome", "reason", "http_status", "detail"),
    [pytest.param(*row[1:], id=row[0]) for row in REPLIES],
)
async def test_provider_reply_maps_to_send_result(
    ably_fake: AblyFake,
    fault: Fault | str | None,
    outcome: Outcome,
    reason: Reason | None,
    http_status: int | None,
    detail: str,
) -> None:
    url = refused_https_url() if fault == "refused" else ably_fake.url
    if isinstance(fault, Fault):
        ably_fake.fail_next(fault)
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=url, timeout=0.5)
    started = time.monotonic()
    try:
        result = await publish(realtime)
    finally:
        await realtime.aclose()

    assert (result.outcome, result.reason, result.http_status) == (outcome, reason, http_status)
    assert detail in result.detail
    assert time.monotonic() - started < 1.5  # the 0.5 s timeout bounds the hang; no SDK retry loop
    assert len(ably_fake.requests) == (0 if fault == "refused" else 1)  # one request: no fallback hosts
    expected_published = 1 if outcome is Outcome.sent else 0
    assert len(ably_fake.messages("notifications:user-1")) == expected_published


# --- presence -------------------------------------------------------------------------------------


async def test_presence_returns_present_members(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    ably_fake.set_present("chat:c1", ["user-1", "user-2"])
    ably_fake.set_present("chat:c2", ["user-9"])

    members = await ably.present_members("chat:c1")

    assert members == frozenset({"user-1", "user-2"})
    [request] = ably_fake.requests
    assert request.method == "GET"
    assert ably_fake.raw_paths == ["/channels/chat%3Ac1/presence"]  # the SDK percent-encodes ":" here
    assert request.path == "/channels/chat:c1/presence"
    assert request.query == "limit=1000"
    assert request.headers["authorization"].startswith("Basic ")


async def test_presence_of_an_empty_channel_is_empty(ably: AblyRealtime) -> None:
    assert await ably.present_members("chat:nobody") == frozenset()


async def test_presence_counts_present_enter_update_only(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    ably_fake.set_presence(
        "chat:c1",
        [
            {"clientId": "present", "connectionId": "a", "action": PRESENT},
            {"clientId": "entered", "connectionId": "b", "action": ENTER},
            {"clientId": "updated", "connectionId": "c", "action": UPDATE},
            {"clientId": "left", "connectionId": "d", "action": LEAVE},
            {"clientId": "absent", "connectionId": "e", "action": 0},
            {"connectionId": "f", "action": PRESENT},  # anonymous connection: no client id
        ],
    )
    assert await ably.present_members("chat:c1") == frozenset({"present", "entered", "updated"})


async def test_presence_follows_pages(ably: AblyRealtime, ably_fake: AblyFake) -> None:
    ids = [f"user-{i}" for i in range(2500)]
    ably_fake.set_present("chat:big", ids)

    assert await ably.present_members("chat:big") == frozenset(ids)
    assert [r.query for r in ably_fake.requests] == ["limit=1000", "limit=1000&cursor=1000", "limit=1000&cursor=2000"]


PRESENCE_FAILURES = [
    ("500", ably_error(500, 50000), AblyException),
    ("401", ably_error(401, 40101), AblyAuthException),
    ("html 200", Fault(200, "<html>ok?</html>", {"content-type": "text/html"}), ValueError),
    ("hang", Fault.hang(2.0), httpx.ReadTimeout),
    ("refused", "refused", httpx.ConnectError),
]


@pytest.mark.parametrize(("fault", "cause"), [pytest.param(*row[1:], id=row[0]) for row in PRESENCE_FAILURES])
async def test_presence_failure_raises_presence_unavailable(
    ably_fake: AblyFake, fault: Fault | str, cause: type[Exception]
) -> None:
    url = refused_https_url() if fault == "refused" else ably_fake.url
    if isinstance(fault, Fault):
        ably_fake.fail_next(fault)
    ably_fake.set_present("chat:c1", ["user-1"])
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=url, timeout=0.5)
    try:
        with pytest.raises(PresenceUnavailable, match="chat:c1") as caught:
            await realtime.present_members("chat:c1")
    finally:
        await realtime.aclose()
    assert type(caught.value.__cause__) is cause


# --- the mapping is complete ----------------------------------------------------------------------


def subclasses(root: type[Exception]) -> Iterator[type[Exception]]:
    yield root
    for sub in root.__subclasses__():
        yield from subclasses(sub)


ABLY_STATUSES: dict[int | None, Outcome] = {
    **dict.fromkeys((400, 401, 403, 404, 409), Outcome.failed),
    **dict.fromkeys((429, 500, 503, None), Outcome.retry),
}


@pytest.mark.parametrize("cls", sorted(set(subclasses(AblyException)), key=str))
def test_every_ably_exception_maps_by_status(cls: type[AblyException]) -> None:
    for status, outcome in ABLY_STATUSES.items():
        result = classify(cls("boom", status, 40000))
        assert result.outcome is outcome, (cls, status)
        assert result.http_status == status
        assert result.reason == (Reason.rejected if outcome is Outcome.failed else None)
        assert result.detail == f"ably {status}/40000: boom"


HTTPX_CLASSES = sorted({c for c in subclasses(httpx.HTTPError) if c.__module__.startswith("httpx")}, key=str)


def test_httpx_tree_is_what_we_expect() -> None:
    names = {c.__name__ for c in HTTPX_CLASSES}
    assert {"ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "HTTPStatusError"} <= names
    assert len(HTTPX_CLASSES) >= 20  # if httpx grows new classes they are covered below automatically


@pytest.mark.parametrize("cls", HTTPX_CLASSES, ids=lambda c: c.__name__)
def test_every_httpx_error_is_mapped_explicitly(cls: type[httpx.HTTPError]) -> None:
    request = httpx.Request("POST", "https://127.0.0.1/channels/x/messages")
    if issubclass(cls, httpx.HTTPStatusError):
        for status, outcome in ((400, Outcome.failed), (429, Outcome.retry), (503, Outcome.retry)):
            status_error = cls("bad", request=request, response=httpx.Response(status, request=request))
            assert classify(status_error).outcome is outcome
            assert classify(status_error).http_status == status
        return
    exc = cls("boom", request=request) if issubclass(cls, httpx.RequestError) else cls("boom")
    result = classify(exc)
    assert result.outcome is Outcome.retry
    assert not result.detail.startswith("unexpected"), result.detail
    if issubclass(cls, httpx.TimeoutException):
        assert result.detail.startswith("timed out")


def test_unknown_exception_is_retried_with_its_class_name() -> None:
    result = classify(ValueError("Unsupported content type"))
    assert (result.outcome, result.reason) == (Outcome.retry, None)
    assert result.detail == "unexpected ValueError: Unsupported content type"


# --- configuration --------------------------------------------------------------------------------


def test_from_settings_is_none_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ABLY_API_KEY", raising=False)
    assert AblyRealtime.from_settings(Settings(ably_rest_url="https://127.0.0.1:8443")) is None


def test_from_settings_builds_a_client_that_hides_its_key() -> None:
    settings = Settings(ably_api_key="app.key:very-secret-value", ably_rest_url="https://127.0.0.1:8443")
    realtime = AblyRealtime.from_settings(settings)
    assert isinstance(realtime, AblyRealtime)
    assert "very-secret-value" not in repr(realtime)
    assert repr(realtime) == "AblyRealtime(endpoint='127.0.0.1')"


def test_key_over_plain_http_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"ABLY_REST_URL must be https://.*got scheme 'http'"):
        AblyRealtime(api_key="app.key:secret", rest_url="http://127.0.0.1:8080", timeout=1)


async def test_the_sdk_itself_refuses_a_key_over_http_and_that_maps_to_rejected() -> None:
    # Why we refuse http:// up front: the SDK would fail every publish with 401/40103 without sending it.
    rest = AblyRest(key="app.key:secret", endpoint="127.0.0.1", tls=False, port=9, use_binary_protocol=False)
    try:
        with pytest.raises(AblyAuthException) as caught:
            await rest.channels.get("notifications:u").publish("n", {"a": 1})
    finally:
        await rest.close()
    assert (caught.value.status_code, caught.value.code) == (401, 40103)
    assert classify(caught.value).reason is Reason.rejected


@pytest.mark.parametrize(
    ("rest_url", "words"),
    [
        ("https://ably-proxy:8443", "must contain a dot"),
        ("https://rest.example.com/ably", "cannot have a path"),
        ("ftp://rest.example.com", "must be https://"),
    ],
)
def test_unusable_rest_urls_are_refused(rest_url: str, words: str) -> None:
    with pytest.raises(ValueError, match="ABLY_REST_URL") as caught:
        AblyRealtime(api_key="app.key:secret", rest_url=rest_url, timeout=1)
    assert words in str(caught.value)


@pytest.mark.parametrize("key", ["app.key-XYZZY", "app.key:XY:ZZY", "app.key:", ":XYZZY"])
def test_malformed_key_is_refused_without_echoing_it(key: str) -> None:
    # The SDK's own message for such a key would include it, secret and all.
    with pytest.raises(ValueError, match="ABLY_API_KEY must look like") as caught:
        AblyRealtime(api_key=key, rest_url=None, timeout=1)
    assert "XY" not in str(caught.value)


async def test_options_for_ablys_own_hosts_and_for_an_override() -> None:
    own = client_options(rest_url=None, timeout=3.0)
    assert own == {"use_binary_protocol": False, "http_open_timeout": 3.0, "http_request_timeout": 3.0,
                   "http_max_retry_duration": 3.0}  # fmt: skip
    override = client_options(rest_url="https://127.0.0.1:8443", timeout=3.0)
    assert override == {**own, "endpoint": "127.0.0.1", "tls": True, "tls_port": 8443, "fallback_hosts": []}

    default_rest = AblyRest(key="app.key:secret", **own)
    override_rest = AblyRest(key="app.key:secret", **override)
    try:
        assert default_rest.options.get_hosts()[0] == "main.realtime.ably.net"
        assert len(default_rest.options.get_hosts()) == 3  # Ably's fallbacks stay on for Ably's own hosts
        assert override_rest.options.get_hosts() == ["127.0.0.1"]
        assert (override_rest.http.preferred_scheme, override_rest.http.preferred_port) == ("https", 8443)
    finally:
        await default_rest.close()
        await override_rest.close()


# --- event loops ----------------------------------------------------------------------------------


def test_client_is_created_and_closed_inside_each_loop(ably_fake: AblyFake) -> None:
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=2)  # no loop running here

    async def publish_and_close(message_id: str) -> Any:
        try:
            return await publish(realtime, message_id)
        finally:
            await realtime.aclose()

    first = asyncio.run(publish_and_close("delivery-1"))
    second = asyncio.run(publish_and_close("delivery-2"))  # a new loop: a new client, no "Event loop is closed"

    assert (first.outcome, second.outcome) == (Outcome.sent, Outcome.sent)
    assert [m.id for m in ably_fake.messages("notifications:user-1")] == ["delivery-1", "delivery-2"]


def test_use_from_a_second_loop_without_aclose_is_refused(ably_fake: AblyFake) -> None:
    realtime = AblyRealtime(api_key=ably_fake.api_key, rest_url=ably_fake.url, timeout=2)

    async def publish_and_close_sdk_only() -> Any:
        result = await publish(realtime)
        await realtime._rest.close()  # close the SDK's client but leave the instance bound to this loop
        return result

    assert asyncio.run(publish_and_close_sdk_only()).outcome is Outcome.sent
    with pytest.raises(RuntimeError, match="bound to the event loop"):
        asyncio.run(publish(realtime, "delivery-2"))
    assert len(ably_fake.requests) == 1
