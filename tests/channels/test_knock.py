"""KnockEmail driven through the real ``knockapi`` SDK against the loopback fake Knock API."""

from __future__ import annotations

import email.utils
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import knockapi
import pytest

from notifier.channels.base import Channel, Message, Outcome, Recipient, SendResult
from notifier.channels.edge import retry_after_seconds
from notifier.channels.knock import KnockEmail, classify_knock_error
from notifier.config import Settings
from notifier.types import ChannelName, Reason
from tests.fakes.base import Fault, refused_url
from tests.fakes.knock import IDEMPOTENCY_WINDOW_SECONDS, KnockFake

TIMEOUT = 0.5


def make_message(*, delivery_id: uuid.UUID | None = None, **overrides: Any) -> Message:
    fields: dict[str, Any] = {
        "delivery_id": delivery_id or uuid.uuid4(),
        "event_id": uuid.UUID("00000000-0000-4000-8000-000000000001"),
        "event_type": "booking.confirmed",
        "channel": ChannelName.email,
        "recipient": Recipient("user-42", "zoe@example.com", "Zoë", "fr-FR", "Europe/Paris"),
        "title": "Réservation confirmée",
        "body": "See you Friday.",
        "html": "<p>See you <b>Friday</b>.</p>",
        "data": {"booking_id": "b-9", "title": "from the event"},
        "action_url": "https://app.example.com/bookings/b-9",
    }
    fields.update(overrides)
    return Message(**fields)


@pytest.fixture
async def knock(knock_fake: KnockFake) -> AsyncIterator[KnockEmail]:
    channel = KnockEmail(api_key=knock_fake.api_key, base_url=knock_fake.url, workflow_prefix="acme-", timeout=TIMEOUT)
    yield channel
    await channel.aclose()


async def test_is_a_channel(knock: KnockEmail) -> None:
    assert isinstance(knock, Channel)
    assert (knock.channel, knock.provider, knock.needs_email) == (ChannelName.email, "knock", True)


async def test_trigger_request_shape(knock: KnockEmail, knock_fake: KnockFake) -> None:
    message = make_message()
    result = await knock.send(message)

    [request] = knock_fake.requests
    [trigger] = knock_fake.triggers
    assert result == SendResult.sent(trigger.workflow_run_id)
    assert (request.method, request.path) == ("POST", "/v1/workflows/acme-booking-confirmed/trigger")
    assert request.headers["authorization"] == f"Bearer {knock_fake.api_key}"
    assert request.headers["idempotency-key"] == str(message.delivery_id)
    assert request.headers["x-stainless-retry-count"] == "0"
    assert request.json() == {
        "recipients": [
            {"id": "user-42", "email": "zoe@example.com", "name": "Zoë", "locale": "fr-FR", "timezone": "Europe/Paris"}
        ],
        "data": {  # the rendered title wins over the event's own "title"
            "booking_id": "b-9",
            "title": "Réservation confirmée",
            "body": "See you Friday.",
            "html": "<p>See you <b>Friday</b>.</p>",
            "action_url": "https://app.example.com/bookings/b-9",
        },
    }
    assert knock_fake.users["user-42"]["email"] == "zoe@example.com"


async def test_optional_fields_are_left_out(knock: KnockEmail, knock_fake: KnockFake) -> None:
    message = make_message(recipient=Recipient("u-1", "a@example.com"), html=None, action_url=None, data={})
    assert (await knock.send(message)).outcome is Outcome.sent
    assert knock_fake.requests[0].json() == {
        "recipients": [{"id": "u-1", "email": "a@example.com"}],
        "data": {"title": "Réservation confirmée", "body": "See you Friday."},
    }


async def test_recipient_without_email_is_refused_without_a_request(knock: KnockEmail, knock_fake: KnockFake) -> None:
    result = await knock.send(make_message(recipient=Recipient("u-1")))
    assert (result.outcome, result.reason) == (Outcome.failed, Reason.rejected)
    assert knock_fake.requests == []


async def test_resending_a_delivery_triggers_one_workflow_run(knock: KnockEmail, knock_fake: KnockFake) -> None:
    message = make_message()
    first, second = await knock.send(message), await knock.send(message)

    assert [r.headers["idempotency-key"] for r in knock_fake.requests] == [str(message.delivery_id)] * 2
    assert len(knock_fake.triggers) == 1
    assert first == second == SendResult.sent(knock_fake.triggers[0].workflow_run_id)
    await knock.send(make_message())  # another delivery of the same event is its own run
    assert len(knock_fake.triggers) == 2


async def test_resend_after_the_24h_window_triggers_again(knock: KnockEmail, knock_fake: KnockFake) -> None:
    message = make_message()
    await knock.send(message)
    knock_fake.clock = lambda: time.time() + IDEMPOTENCY_WINDOW_SECONDS + 1
    await knock.send(message)
    assert len(knock_fake.triggers) == 2


async def test_same_key_with_other_params_is_rejected(knock: KnockEmail, knock_fake: KnockFake) -> None:
    delivery_id = uuid.uuid4()
    await knock.send(make_message(delivery_id=delivery_id))
    result = await knock.send(make_message(delivery_id=delivery_id, title="Changed"))
    assert (result.outcome, result.reason, result.http_status) == (Outcome.failed, Reason.rejected, 422)
    assert "idempotency_key_mismatch" in result.detail
    assert len(knock_fake.triggers) == 1


@dataclass(frozen=True)
class Case:
    fault: Fault | Callable[[], Fault] | None  # a callable builds the fault when the test runs
    outcome: Outcome
    status: int | None = None
    retry_after: float | None = None
    detail: str = ""
    target: str = "fake"  # or "refused", "bad_key"
    reason: Reason | None = None


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


TABLE: dict[str, Case] = {
    "200": Case(None, Outcome.sent),
    "400": Case(Fault.http(400), Outcome.failed, 400, reason=Reason.rejected, detail="scripted 400"),
    "401 wrong key": Case(None, Outcome.failed, 401, reason=Reason.rejected, detail="api_key", target="bad_key"),
    "403": Case(Fault.http(403), Outcome.failed, 403, reason=Reason.rejected),
    "404": Case(Fault.http(404), Outcome.failed, 404, reason=Reason.rejected),
    "413": Case(Fault.http(413), Outcome.failed, 413, reason=Reason.rejected),
    "422": Case(Fault.http(422), Outcome.failed, 422, reason=Reason.rejected),
    "408": Case(Fault.http(408), Outcome.retry, 408),
    "409": Case(Fault.http(409), Outcome.retry, 409),
    "429 Retry-After s": Case(Fault.rate_limited(7), Outcome.retry, 429, retry_after=7.0),
    "429 retry-after-ms": Case(Fault.http(429, **{"retry-after-ms": "1500"}), Outcome.retry, 429, retry_after=1.5),
    "429 Retry-After date": Case(lambda: Fault.http(429, **{"Retry-After": _http_date(30)}), Outcome.retry, 429, 30.0),
    "500": Case(Fault.http(500), Outcome.retry, 500, detail="scripted 500"),
    "503 HTML": Case(Fault(503, "<html>down</html>", {"Retry-After": "120"}), Outcome.retry, 503, 120.0, "<html>"),
    "hang past timeout": Case(Fault.hang(1.5), Outcome.retry, detail="timed out (ReadTimeout)"),
    "connection refused": Case(None, Outcome.retry, detail="ConnectError", target="refused"),
}


@pytest.mark.parametrize("case", TABLE.values(), ids=TABLE.keys())
async def test_reply_table(case: Case, knock_fake: KnockFake) -> None:
    base_url = refused_url() if case.target == "refused" else knock_fake.url
    api_key = "sk_wrong" if case.target == "bad_key" else knock_fake.api_key
    channel = KnockEmail(api_key=api_key, base_url=base_url, workflow_prefix="", timeout=TIMEOUT)
    if case.fault is not None:
        knock_fake.fail_next(case.fault() if callable(case.fault) else case.fault)
    started = time.monotonic()
    result = await channel.send(make_message())
    elapsed = time.monotonic() - started
    await channel.aclose()

    assert (result.outcome, result.reason, result.http_status) == (case.outcome, case.reason, case.status)
    if case.retry_after is None:
        assert result.retry_after is None
    else:
        # the HTTP-date case: the date has whole seconds (up to 1 s lost) and the clock ticks while the test runs
        assert result.retry_after == pytest.approx(case.retry_after, abs=2)
    assert case.detail in result.detail
    assert elapsed < 1.5  # no SDK backoff sleeps, and the 0.5 s timeout held
    # Exactly one HTTP attempt per send: the SDK's retries are off.
    assert len(knock_fake.trigger_requests()) == (0 if case.target == "refused" else 1)
    assert len(knock_fake.triggers) == (1 if case.outcome is Outcome.sent else 0)
    if case.outcome is Outcome.sent:
        assert result.provider_message_id == knock_fake.triggers[0].workflow_run_id


def _response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://knock.test/v1/x"))


_REQ = httpx.Request("POST", "http://knock.test/v1/x")


def _status(cls: type[knockapi.APIStatusError], status: int, body: object = None) -> knockapi.APIStatusError:
    return cls(f"Error code: {status}", response=_response(status), body=body)


# Every exception class knockapi exports, with the outcome it must map to.
KNOCK_ERRORS: list[tuple[Exception, Outcome]] = [
    (knockapi.KnockError("odd"), Outcome.retry),
    (knockapi.APIError("odd", _REQ, body=None), Outcome.retry),
    (_status(knockapi.APIStatusError, 418), Outcome.failed),
    (_status(knockapi.BadRequestError, 400, {"code": "invalid_params"}), Outcome.failed),
    (_status(knockapi.AuthenticationError, 401, {}), Outcome.failed),
    (_status(knockapi.PermissionDeniedError, 403, ""), Outcome.failed),
    (_status(knockapi.NotFoundError, 404), Outcome.failed),
    (_status(knockapi.ConflictError, 409), Outcome.retry),
    (_status(knockapi.UnprocessableEntityError, 422), Outcome.failed),
    (_status(knockapi.RateLimitError, 429), Outcome.retry),
    (_status(knockapi.InternalServerError, 502, "<html>bad gateway</html>"), Outcome.retry),
    (knockapi.APIConnectionError(request=_REQ), Outcome.retry),
    (knockapi.APITimeoutError(request=_REQ), Outcome.retry),
    (knockapi.APIResponseValidationError(_response(200), body="?"), Outcome.sent),
]


def test_knock_mapping_is_complete() -> None:
    exported = {
        obj for obj in list(vars(knockapi).values()) if inspect.isclass(obj) and issubclass(obj, knockapi.KnockError)
    }
    assert exported == {type(exc) for exc, _ in KNOCK_ERRORS}, "a knockapi exception class has no expected outcome"
    for exc, outcome in KNOCK_ERRORS:
        result = classify_knock_error(exc)
        assert result.outcome is outcome, type(exc).__name__
        assert (result.reason is Reason.rejected) == (outcome is Outcome.failed), type(exc).__name__


def _httpx_error(cls: type[Exception]) -> Exception:
    if cls is httpx.HTTPStatusError:
        return httpx.HTTPStatusError("boom", request=_REQ, response=_response(500))
    try:
        return cls("boom")
    except TypeError:
        return cls()


HTTPX_ERRORS = [c for c in vars(httpx).values() if inspect.isclass(c) and issubclass(c, Exception)]


@pytest.mark.parametrize("cls", [*HTTPX_ERRORS, ValueError, RuntimeError], ids=lambda c: c.__name__)
def test_raw_and_unknown_exceptions_are_retried_by_name(cls: type[Exception]) -> None:
    result = classify_knock_error(_httpx_error(cls))
    assert result.outcome is Outcome.retry
    assert cls.__name__ in result.detail


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"Retry-After": "Thu, 01 Jan 2026 00:01:40 GMT"}, 100.0),
        ({"Retry-After": "Wed, 31 Dec 2025 23:00:00 GMT"}, 0.0),
        ({"Retry-After": "-3"}, None),
        ({"Retry-After": "tomorrow"}, None),
        ({}, None),
    ],
)
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    now = 1767225600.0  # 2026-01-01T00:00:00Z
    assert retry_after_seconds(httpx.Headers(headers), now=lambda: now) == expected


async def test_from_settings(knock_fake: KnockFake) -> None:
    assert KnockEmail.from_settings(Settings(knock_api_key=None)) is None
    settings = Settings(
        knock_api_key=knock_fake.api_key, knock_base_url=knock_fake.url + "/", knock_workflow_prefix="p-"
    )
    channel = KnockEmail.from_settings(settings)
    assert channel is not None
    assert (await channel.send(make_message(event_type="chat.message.created"))).outcome is Outcome.sent
    assert knock_fake.requests[0].path == "/v1/workflows/p-chat-message-created/trigger"
    await channel.aclose()


async def test_fake_accepts_user_updates(knock_fake: KnockFake) -> None:
    client = knockapi.AsyncKnock(api_key=knock_fake.api_key, base_url=knock_fake.url, max_retries=0)
    user = await client.users.update("user-7", email="u7@example.com", name="U7")
    await client.close()
    assert (user.id, user.email) == ("user-7", "u7@example.com")
    assert knock_fake.requests[0].method == "PUT"
    assert knock_fake.triggers == []
