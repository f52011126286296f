"""The OneSignal push channel, driving the real SDK against the loopback fake."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import http.client
import inspect
import io
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import onesignal.exceptions
import pytest
import urllib3
import urllib3.exceptions
from onesignal.model.create_notification_success_response import CreateNotificationSuccessResponse
from onesignal.rest import RESTResponse

from notifier.channels.base import IDEMPOTENCY_NAMESPACE, Channel, Message, Outcome, Recipient, SendResult
from notifier.channels.edge import retry_after_seconds as retry_after
from notifier.channels.onesignal import (
    OneSignalPush,
    classify_error,
    classify_reply,
    onesignal_language,
)
from notifier.config import Settings
from notifier.types import ChannelName, Reason
from tests.fakes.base import Fault, refused_url
from tests.fakes.onesignal import INVALID_API_KEY, NO_SUBSCRIBERS, NO_TARGETING, OneSignalFake

MakePush = Callable[..., OneSignalPush]


def make_message(
    *,
    recipient_id: str = "user-1",
    delivery_id: uuid.UUID | None = None,
    locale: str | None = None,
    data: dict[str, Any] | None = None,
    action_url: str | None = None,
) -> Message:
    return Message(
        delivery_id=delivery_id or uuid.uuid4(),
        event_id=uuid.uuid4(),
        event_type="chat.message",
        channel=ChannelName.push,
        recipient=Recipient(id=recipient_id, locale=locale),
        title="New reply",
        body="Ada: see you at 6",
        data=data if data is not None else {},
        action_url=action_url,
    )


@pytest.fixture
async def make_push(onesignal_fake: OneSignalFake) -> AsyncIterator[MakePush]:
    """Build channels pointed at the fake (overridable per test); close them all afterwards."""
    channels: list[OneSignalPush] = []

    def make(**overrides: Any) -> OneSignalPush:
        kwargs: dict[str, Any] = {
            "app_id": onesignal_fake.app_id,
            "api_key": onesignal_fake.api_key,
            "api_url": onesignal_fake.url + "/",  # the trailing slash must not reach the path
            "timeout": 2.0,
        }
        channel = OneSignalPush(**(kwargs | overrides))
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.aclose()


def onesignal_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("onesignal") and t.is_alive()}


# --- request shape and idempotency ------------------------------------------------------------------


def test_class_data_satisfies_the_channel_protocol(make_push: MakePush) -> None:
    assert OneSignalPush.channel is ChannelName.push
    assert OneSignalPush.provider == "onesignal"
    assert OneSignalPush.needs_email is False
    assert isinstance(make_push(), Channel)


async def test_request_shape(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    message = make_message(data={"conversation_id": "c-9"}, action_url="https://app.example.com/c/9")

    result = await make_push().send(message)

    [created] = onesignal_fake.notifications
    assert result == SendResult.sent(created.id, http_status=200)
    [request] = onesignal_fake.requests
    assert (request.method, request.path) == ("POST", "/notifications")
    assert request.headers["authorization"] == f"Key {onesignal_fake.api_key}"
    assert request.headers["content-type"] == "application/json"
    expected_key = uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(message.delivery_id))
    assert request.json() == {
        "app_id": onesignal_fake.app_id,
        "include_aliases": {"external_id": ["user-1"]},
        "target_channel": "push",
        "headings": {"en": "New reply"},
        "contents": {"en": "Ada: see you at 6"},
        "data": {"conversation_id": "c-9", "action_url": "https://app.example.com/c/9"},
        "idempotency_key": str(expected_key),
    }
    assert uuid.UUID(request.json()["idempotency_key"]).version == 5


async def test_no_data_and_no_link_sends_no_data_field(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    await make_push().send(make_message())

    assert "data" not in onesignal_fake.requests[0].json()


async def test_data_values_are_sent_as_json(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    ref = uuid.uuid4()
    at = dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.UTC)

    result = await make_push().send(make_message(data={"ref": ref, "at": at, "ids": (1, 2), "n": None}))

    assert result.outcome is Outcome.sent
    assert onesignal_fake.requests[0].json()["data"] == {"ref": str(ref), "at": str(at), "ids": [1, 2], "n": None}


async def test_data_that_is_not_json_fails_without_a_request(
    onesignal_fake: OneSignalFake, make_push: MakePush
) -> None:
    result = await make_push().send(make_message(data={"ratio": float("nan")}))

    assert result.outcome is Outcome.failed
    assert result.reason is Reason.rejected
    assert result.detail.startswith("invalid notification: ValueError")
    assert onesignal_fake.requests == []


async def test_same_delivery_twice_is_one_notification(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    push = make_push()
    message = make_message()

    first = await push.send(message)
    second = await push.send(message)

    assert len(onesignal_fake.notifications) == 1
    assert [r.json()["idempotency_key"] for r in onesignal_fake.requests] == [str(message.idempotency_uuid)] * 2
    assert first.outcome is second.outcome is Outcome.sent
    assert first.provider_message_id == second.provider_message_id == onesignal_fake.notifications[0].id
    assert (first.detail, second.detail) == ("", "replayed")


async def test_retry_after_a_lost_reply_does_not_send_twice(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    push = make_push(timeout=0.3)
    message = make_message()
    onesignal_fake.latency = 1.0  # OneSignal creates the notification, but the reply comes too late

    lost = await push.send(message)
    onesignal_fake.latency = 0.0
    retried = await push.send(message)

    assert lost.outcome is Outcome.retry
    assert retried == SendResult.sent(onesignal_fake.notifications[0].id, http_status=200, detail="replayed")
    assert len(onesignal_fake.notifications) == 1
    assert len(onesignal_fake.requests) == 2


async def test_different_deliveries_are_different_notifications(
    onesignal_fake: OneSignalFake, make_push: MakePush
) -> None:
    push = make_push()

    results = [await push.send(make_message()) for _ in range(2)]

    assert len(onesignal_fake.notifications) == 2
    assert results[0].provider_message_id != results[1].provider_message_id
    keys = {r.json()["idempotency_key"] for r in onesignal_fake.requests}
    assert len(keys) == 2


async def test_recipient_locale_adds_a_language_key(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    await make_push().send(make_message(locale="fr_CA"))

    body = onesignal_fake.requests[0].json()
    assert body["headings"] == {"en": "New reply", "fr": "New reply"}
    assert body["contents"] == {"en": "Ada: see you at 6", "fr": "Ada: see you at 6"}


@pytest.mark.parametrize(
    ("locale", "language"),
    [
        ("de-AT", "de"),
        ("pt_BR", "pt"),
        ("EN-gb", "en"),
        ("zh-TW", "zh-Hant"),
        ("zh-Hant-HK", "zh-Hant"),
        ("zh-CN", "zh-Hans"),
        ("zh", "zh-Hans"),
        ("", None),
        (None, None),
    ],
)
def test_onesignal_language(locale: str | None, language: str | None) -> None:
    assert onesignal_language(locale) == language


# --- provider reply -> SendResult ------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    arrange: Callable[[OneSignalFake], dict[str, Any] | None]  # scripts the fake; may override channel kwargs
    outcome: Outcome
    reason: Reason | None = None
    http_status: int | None = None
    retry_after: float | None = None
    detail: str = ""  # must appear in the result's detail
    requests: int = 1


def _fault(*faults: Fault) -> Callable[[OneSignalFake], None]:
    return lambda fake: fake.fail_next(*faults)


def _hang_past(timeout: float) -> Callable[[OneSignalFake], dict[str, Any]]:
    def arrange(fake: OneSignalFake) -> dict[str, Any]:
        fake.fail_next(Fault.hang(timeout + 0.7))
        return {"timeout": timeout}

    return arrange


HTML = {"content-type": "text/html"}
UNAVAILABLE = "Service temporarily unavailable"
TABLE = [
    Row("200 sent", lambda fake: None, Outcome.sent, http_status=200),
    Row("200 not subscribed", lambda fake: fake.unsubscribe("user-1"), Outcome.failed, Reason.not_subscribed, 200,
        detail=NO_SUBSCRIBERS),
    Row("200 unknown alias", lambda fake: fake.forget("user-1"), Outcome.failed, Reason.not_subscribed, 200,
        detail="invalid_aliases"),
    Row("400", _fault(Fault.http(400, {"errors": [NO_TARGETING]})), Outcome.failed, Reason.rejected, 400,
        detail=NO_TARGETING),
    Row("401", _fault(Fault.http(401, {"errors": ["Unauthorized"]})), Outcome.failed, Reason.rejected, 401,
        detail="Unauthorized"),
    Row("403 wrong key", lambda fake: {"api_key": "os_v2_app_wrong"}, Outcome.failed, Reason.rejected, 403,
        detail=INVALID_API_KEY),
    Row("404", _fault(Fault.http(404, {"errors": ["Not Found"]})), Outcome.failed, Reason.rejected, 404,
        detail="Not Found"),
    Row("422 other 4xx", _fault(Fault.http(422, {"errors": ["bad"]})), Outcome.failed, Reason.rejected, 422),
    Row("408", _fault(Fault.http(408)), Outcome.retry, http_status=408),
    Row("429 Retry-After", _fault(Fault.rate_limited(2, {"errors": ["API rate limit exceeded."]})), Outcome.retry,
        http_status=429, retry_after=2.0, detail="API rate limit exceeded."),
    Row("500", _fault(Fault.http(500)), Outcome.retry, http_status=500, detail="scripted 500"),
    Row("503 Retry-After", _fault(Fault.http(503, {"errors": [UNAVAILABLE]}, **{"Retry-After": "7"})), Outcome.retry,
        http_status=503, retry_after=7.0, detail=UNAVAILABLE),
    Row("HTML 503", _fault(Fault.http(503, "<html><body>upstream down</body></html>", **HTML)), Outcome.retry,
        http_status=503, detail="<html><body>upstream down"),
    Row("200 not JSON", _fault(Fault.http(200, "<html>maintenance</html>", **HTML)), Outcome.retry,
        detail="ApiTypeError"),
    Row("hang past timeout", _hang_past(timeout=0.3), Outcome.retry,
        detail="timed out: ReadTimeoutError"),
    Row("connection refused", lambda fake: {"api_url": refused_url()}, Outcome.retry,
        detail="connection failed: NewConnectionError", requests=0),
    Row("TLS to a plain-HTTP server", lambda fake: {"api_url": fake.url.replace("http://", "https://")},
        Outcome.retry, detail="SSLError", requests=0),
]  # fmt: skip


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
async def test_reply_to_result(row: Row, onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    push = make_push(**(row.arrange(onesignal_fake) or {}))
    started = time.monotonic()

    result = await push.send(make_message())

    assert time.monotonic() - started < 1.5
    assert result.outcome is row.outcome
    assert result.reason is row.reason
    assert result.http_status == row.http_status
    assert result.retry_after == row.retry_after
    assert row.detail in result.detail
    assert onesignal_fake.api_key not in result.detail
    assert len(onesignal_fake.requests) == row.requests
    if row.outcome is Outcome.sent:
        assert result.provider_message_id == onesignal_fake.notifications[0].id
    else:
        assert result.provider_message_id is None


async def test_detail_never_carries_the_api_key(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    onesignal_fake.fail_next(Fault.http(400, {"errors": [f"key {onesignal_fake.api_key} is not valid"]}))

    result = await make_push().send(make_message())

    assert onesignal_fake.api_key not in result.detail
    assert "key [redacted] is not valid" in result.detail


async def test_detail_is_truncated(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    onesignal_fake.fail_next(Fault.http(503, "x" * 5000, **HTML))

    result = await make_push().send(make_message())

    assert len(result.detail) == 500
    assert result.detail.endswith("…")


@pytest.mark.parametrize(
    ("errors", "outcome"),
    [
        (None, Outcome.sent),
        ({"invalid_aliases": {"external_id": ["someone-else"]}}, Outcome.sent),
        ({"invalid_aliases": {"external_id": ["user-1"]}}, Outcome.failed),
        ({"invalid_external_user_ids": ["user-1"]}, Outcome.failed),
        ({"invalid_aliases": ["user-1"]}, Outcome.sent),  # a shape we do not know: the id says it was created
    ],
)
def test_classify_reply_invalid_aliases(errors: Any, outcome: Outcome) -> None:
    kwargs = {"errors": errors} if errors is not None else {}
    reply = CreateNotificationSuccessResponse(id="9b1c3c1e-0000-4000-8000-000000000001", **kwargs)

    [result] = classify_reply(reply, recipient_ids=["user-1"])

    assert result.outcome is outcome
    assert result.reason is (Reason.not_subscribed if outcome is Outcome.failed else None)


def test_classify_reply_without_an_id_is_not_sent() -> None:
    [result] = classify_reply(CreateNotificationSuccessResponse(id=""), recipient_ids=["user-1"])

    assert (result.outcome, result.reason, result.detail) == (
        Outcome.failed,
        Reason.not_subscribed,
        "no notification created",
    )


# --- the exception mapping is complete ----------------------------------------------------------


POOL = urllib3.HTTPConnectionPool("127.0.0.1", 1)
CONN = urllib3.connection.HTTPConnection("127.0.0.1", 1)
URL = "http://127.0.0.1:1/notifications"
# Classes whose constructors need more than a message.
FACTORIES: dict[type[BaseException], Callable[[], BaseException]] = {
    urllib3.exceptions.PoolError: lambda: urllib3.exceptions.PoolError(POOL, "boom"),
    urllib3.exceptions.ClosedPoolError: lambda: urllib3.exceptions.ClosedPoolError(POOL, "Pool is closed."),
    urllib3.exceptions.EmptyPoolError: lambda: urllib3.exceptions.EmptyPoolError(POOL, "Pool is empty."),
    urllib3.exceptions.FullPoolError: lambda: urllib3.exceptions.FullPoolError(POOL, "Pool is full."),
    urllib3.exceptions.RequestError: lambda: urllib3.exceptions.RequestError(POOL, URL, "boom"),
    urllib3.exceptions.ReadTimeoutError: lambda: urllib3.exceptions.ReadTimeoutError(POOL, URL, "Read timed out."),
    urllib3.exceptions.MaxRetryError: lambda: urllib3.exceptions.MaxRetryError(POOL, URL),
    urllib3.exceptions.HostChangedError: lambda: urllib3.exceptions.HostChangedError(POOL, URL),
    urllib3.exceptions.NewConnectionError: lambda: urllib3.exceptions.NewConnectionError(CONN, "refused"),
    urllib3.exceptions.NameResolutionError: lambda: urllib3.exceptions.NameResolutionError(
        "api.onesignal.com", CONN, socket.gaierror(-2, "Name or service not known")
    ),
    urllib3.exceptions.HeaderParsingError: lambda: urllib3.exceptions.HeaderParsingError([], b"junk"),
    urllib3.exceptions.IncompleteRead: lambda: urllib3.exceptions.IncompleteRead(3, 10),
    urllib3.exceptions.InvalidChunkLength: lambda: urllib3.exceptions.InvalidChunkLength(
        urllib3.HTTPResponse(body=io.BytesIO(b""), preload_content=False), b"zz"
    ),
    urllib3.exceptions.LocationParseError: lambda: urllib3.exceptions.LocationParseError("http://[::1"),
    urllib3.exceptions.ProxyError: lambda: urllib3.exceptions.ProxyError("proxy down", OSError("refused")),
    urllib3.exceptions.ProxySchemeUnknown: lambda: urllib3.exceptions.ProxySchemeUnknown("ftp"),
    urllib3.exceptions.URLSchemeUnknown: lambda: urllib3.exceptions.URLSchemeUnknown("ftp"),
    http.client.IncompleteRead: lambda: http.client.IncompleteRead(b"par"),  # urllib3's httplib_IncompleteRead
}
# The status each ApiException subclass stands for (the SDK picks the class by status).
API_STATUSES: dict[type[BaseException], int] = {
    onesignal.exceptions.ApiException: 400,
    onesignal.exceptions.UnauthorizedException: 401,
    onesignal.exceptions.ForbiddenException: 403,
    onesignal.exceptions.NotFoundException: 404,
    onesignal.exceptions.ServiceException: 503,
}
# Not from the SDK's modules, but reachable: asyncio's deadline, raw sockets, a shut-down pool, SDK bugs.
OTHER_RAISABLE: list[type[BaseException]] = [
    TimeoutError, ConnectionRefusedError, OSError, AttributeError, RuntimeError, ValueError, KeyError, Exception
]  # fmt: skip


def raisable_classes() -> list[type[BaseException]]:
    found = [
        cls
        for module in (urllib3.exceptions, onesignal.exceptions)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and not issubclass(cls, Warning)
    ]
    return sorted(set(found), key=lambda cls: f"{cls.__module__}.{cls.__qualname__}") + OTHER_RAISABLE


def api_error(
    cls: type[BaseException], status: int, body: bytes = b'{"errors": ["x"]}', headers: dict[str, str] | None = None
) -> BaseException:
    response = urllib3.HTTPResponse(body=body, status=status, reason="Reason", headers=headers, preload_content=True)
    return cls(http_resp=RESTResponse(response))  # type: ignore[call-arg]


def instantiate(cls: type[BaseException]) -> BaseException:
    if cls in API_STATUSES:
        return api_error(cls, API_STATUSES[cls])
    if cls in FACTORIES:
        return FACTORIES[cls]()
    return cls("boom")


def test_mapping_covers_at_least_the_known_classes() -> None:
    names = {cls.__name__ for cls in raisable_classes()}
    assert {"MaxRetryError", "NewConnectionError", "ProtocolError", "ReadTimeoutError", "SSLError"} <= names
    assert {"ApiException", "ServiceException", "ApiTypeError", "ApiValueError"} <= names
    assert len(names) >= 40


@pytest.mark.parametrize("cls", raisable_classes(), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_exception_class_maps(cls: type[BaseException]) -> None:
    exc = instantiate(cls)

    result = classify_error(exc)

    assert isinstance(result, SendResult)
    status = API_STATUSES.get(cls)
    if status is not None and status < 500:
        assert (result.outcome, result.reason, result.http_status) == (Outcome.failed, Reason.rejected, status)
    else:
        assert result.outcome is Outcome.retry
        assert result.reason is None
        assert (cls.__name__ in result.detail) if status is None else (result.http_status == status)


@pytest.mark.parametrize(
    ("exc", "outcome", "http_status", "after"),
    [
        (api_error(onesignal.exceptions.ApiException, 429, headers={"Retry-After": "3"}), Outcome.retry, 429, 3.0),
        (api_error(onesignal.exceptions.ApiException, 409), Outcome.failed, 409, None),
        (api_error(onesignal.exceptions.ApiException, 301), Outcome.failed, 301, None),
        (api_error(onesignal.exceptions.ServiceException, 502, b"<html>bad gateway</html>"), Outcome.retry, 502, None),
        (onesignal.exceptions.ApiException(status=0, reason="SSLError\nhandshake failed"), Outcome.retry, None, None),
        (onesignal.exceptions.ApiException(), Outcome.retry, None, None),
    ],
    ids=["429", "409", "301", "502 html", "status 0", "no status"],
)
def test_api_exception_by_status(exc: Any, outcome: Outcome, http_status: int | None, after: float | None) -> None:
    result = classify_error(exc)

    assert (result.outcome, result.http_status, result.retry_after) == (outcome, http_status, after)


def test_max_retry_error_is_classified_by_its_reason() -> None:
    reason = urllib3.exceptions.NewConnectionError(CONN, "[Errno 111] Connection refused")

    result = classify_error(urllib3.exceptions.MaxRetryError(POOL, URL, reason))

    assert result.outcome is Outcome.retry
    assert result.detail.startswith("connection failed: NewConnectionError")


def test_the_sdk_ssl_quirk_is_retried_with_the_real_error() -> None:
    try:
        try:
            raise onesignal.exceptions.ApiException(status=0, reason="SSLError\ncertificate verify failed")
        except onesignal.exceptions.ApiException as e:
            e.body.decode("utf-8")  # what api_client.py does; body is None
    except AttributeError as quirk:
        result = classify_error(quirk)

    assert result.outcome is Outcome.retry
    assert "certificate verify failed" in result.detail


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2", 2.0), ("0.5", 0.5), ("-3", None), ("inf", None), ("nan", None), ("soon", None), ("", None), (None, None)],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert retry_after({"Retry-After": value} if value is not None else {}) == seconds


def test_retry_after_http_date() -> None:
    when = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True)

    assert retry_after({"retry-after": when}) == pytest.approx(30, abs=2)


# --- settings and lifecycle ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "configured",
    [
        {},
        {"onesignal_app_id": "app"},
        {"onesignal_rest_api_key": "key"},
        {"onesignal_app_id": "", "onesignal_rest_api_key": "key"},
    ],
    ids=["nothing", "app id only", "key only", "empty app id"],
)
def test_from_settings_is_none_when_unconfigured(configured: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ONESIGNAL_APP_ID", "ONESIGNAL_REST_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    assert OneSignalPush.from_settings(Settings.model_validate(configured)) is None


async def test_from_settings_builds_a_working_channel(onesignal_fake: OneSignalFake) -> None:
    settings = Settings(
        onesignal_app_id=onesignal_fake.app_id,
        onesignal_rest_api_key=onesignal_fake.api_key,
        onesignal_api_url=onesignal_fake.url + "/",
        provider_timeout_seconds=1.5,
    )
    push = OneSignalPush.from_settings(settings)
    assert push is not None
    try:
        result = await push.send(make_message())
    finally:
        await push.aclose()

    assert result.outcome is Outcome.sent
    assert onesignal_fake.requests[0].path == "/notifications"
    assert onesignal_fake.api_key not in repr(push)


@pytest.mark.parametrize("bad", [{"timeout": 0}, {"timeout": -1.0}, {"max_concurrency": 0}])
def test_constructor_refuses_unbounded_settings(bad: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"app_id": "a", "api_key": "k", "api_url": "http://127.0.0.1:1", "timeout": 1.0}
    with pytest.raises(ValueError, match=next(iter(bad))):
        OneSignalPush(**(kwargs | bad))


async def test_aclose_releases_the_thread_pool(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    before = onesignal_threads()
    push = make_push()
    assert (await push.send(make_message())).outcome is Outcome.sent
    assert onesignal_threads() - before

    await push.aclose()
    await push.aclose()  # a second close is harmless

    assert not onesignal_threads() - before
    late = await push.send(make_message())
    assert late.outcome is Outcome.retry
    assert "RuntimeError" in late.detail
    assert len(onesignal_fake.requests) == 1


async def test_urllib3_does_not_retry_on_its_own(make_push: MakePush, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = 0

    def refuse(*args: Any, **kwargs: Any) -> socket.socket:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError(111, "Connection refused")

    # urllib3 would retry a refused connection 3 more times by default; the dispatcher owns retries.
    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse)

    result = await make_push().send(make_message())

    assert result.outcome is Outcome.retry
    assert result.detail.startswith("connection failed: NewConnectionError")
    assert attempts == 1


# --- never blocks the event loop ------------------------------------------------------------------


async def test_send_does_not_block_the_event_loop(onesignal_fake: OneSignalFake, make_push: MakePush) -> None:
    push = make_push(timeout=0.5)
    onesignal_fake.fail_next(Fault.hang(2.5))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    result = await push.send(make_message())
    elapsed = time.monotonic() - started
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker

    assert result.outcome is Outcome.retry
    assert 0.45 <= elapsed < 2.0  # the channel's 0.5 s deadline, not the provider's 2.5 s hang
    assert ticks >= 10  # about 25 if the loop is free while the SDK waits; 0 if send blocked it


@pytest.mark.parametrize(("max_concurrency", "peak"), [(2, 2), (8, 6)])
async def test_sends_run_in_parallel_up_to_the_bound(
    max_concurrency: int, peak: int, onesignal_fake: OneSignalFake, make_push: MakePush
) -> None:
    push = make_push(max_concurrency=max_concurrency, timeout=5.0)
    # Long enough that all six calls overlap even on a loaded machine (0.2 s saw a peak of 4 under two suites
    # and a CPU burner on two cores: the first calls answered before the last SDK threads had sent theirs).
    onesignal_fake.latency = 1.0

    results = await asyncio.gather(*(push.send(make_message()) for _ in range(6)))

    assert [r.outcome for r in results] == [Outcome.sent] * 6
    assert len({r.provider_message_id for r in results}) == 6
    assert onesignal_fake.peak_in_flight == peak


async def test_a_call_stuck_past_the_deadline_is_abandoned(
    make_push: MakePush, monkeypatch: pytest.MonkeyPatch
) -> None:
    push = make_push(timeout=0.2)
    release = threading.Event()

    def stuck(*args: Any, **kwargs: Any) -> Any:  # e.g. a DNS lookup, which urllib3's timeout does not cover
        release.wait(5)
        raise urllib3.exceptions.ProtocolError("released")

    monkeypatch.setattr(push._client, "call_api", stuck)
    started = time.monotonic()
    try:
        result = await push.send(make_message())
    finally:
        release.set()

    assert time.monotonic() - started < 1.0
    assert result.outcome is Outcome.retry
    assert result.detail.startswith("timed out: TimeoutError")
