"""Push over OneSignal, through the official SDK (``onesignal-python-api``).

The SDK is blocking urllib3 with no default timeout, so every call runs on a small thread pool the
channel owns, with ``_request_timeout`` always set and urllib3's own retries off: the dispatcher (or
QStash) is the only retry loop, and the deterministic ``idempotency_key`` makes its retries safe.

Two functions are the edge where the SDK's world becomes a ``SendResult``: ``classify_reply`` for a
2xx reply and ``classify_error`` for anything raised — the SDK's ``ApiException`` family, the raw
urllib3 transport errors it lets through, and whatever else might escape.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import onesignal
import urllib3
from onesignal.api.default_api import DefaultApi
from onesignal.exceptions import ApiException, ApiTypeError

from notifier.channels.base import Message, MessageGroup, SendResult
from notifier.channels.edge import describe, finish, header, retry_after_seconds
from notifier.config import Settings
from notifier.types import ChannelName, Reason

# 408 and 429 are "not now", not "never"; every other 4xx is a refusal that a retry would repeat.
RETRYABLE_4XX = frozenset({408, 429})


class OneSignalPush:
    """The push channel: one OneSignal notification per send group (or message), targeted by external ids."""

    channel: ClassVar[ChannelName] = ChannelName.push
    provider: ClassVar[str] = "onesignal"
    needs_email: ClassVar[bool] = False
    group_limit: ClassVar[int] = 2000  # external ids one notification may target
    # OneSignal replays an idempotency_key's first result for 30 days
    # (https://documentation.onesignal.com/reference/idempotent-notification-requests).
    dedupe_window: ClassVar[dt.timedelta | None] = dt.timedelta(days=30)

    def __init__(self, *, app_id: str, api_key: str, api_url: str, timeout: float, max_concurrency: int = 8) -> None:
        if timeout <= 0:
            # The SDK treats a falsy timeout as "wait forever".
            raise ValueError(f"OneSignal timeout must be positive, got {timeout!r}")
        if max_concurrency < 1:
            raise ValueError(f"OneSignal max_concurrency must be at least 1, got {max_concurrency!r}")
        self._app_id = app_id
        self._api_key = api_key
        self._api_url = api_url.rstrip("/")  # the SDK appends "/notifications" verbatim
        self._timeout = timeout
        config = onesignal.Configuration(host=self._api_url, rest_api_key=api_key)
        config.retries = False  # no urllib3 retries: one attempt per send, errors raised as they are
        config.connection_pool_maxsize = max_concurrency
        self._client = onesignal.ApiClient(config)
        self._api = DefaultApi(self._client)
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="onesignal")

    @classmethod
    def from_settings(cls, settings: Settings) -> OneSignalPush | None:
        """Return a channel built from settings, or None when the app id or REST API key is missing."""
        if not settings.onesignal_app_id or settings.onesignal_rest_api_key is None:
            return None
        return cls(
            app_id=settings.onesignal_app_id,
            api_key=settings.onesignal_rest_api_key.get_secret_value(),
            api_url=settings.onesignal_api_url,
            timeout=settings.provider_timeout_seconds,
            # one thread per local worker: fewer would queue push sends behind each other (measured in bench/)
            max_concurrency=settings.workers,
        )

    def __repr__(self) -> str:
        return f"OneSignalPush(app_id={self._app_id!r}, api_url={self._api_url!r})"

    async def send(self, message: Message) -> SendResult:
        """Create one push notification for ``message``; return how OneSignal answered. Never raises."""
        [result] = await self.send_group(MessageGroup.alone(message))
        return result

    async def send_group(self, group: MessageGroup) -> list[SendResult]:
        """Create one notification for every member of ``group``; classify each member. Never raises.

        Members OneSignal names as invalid aliases fail ``not_subscribed``; the others share the outcome.
        """
        try:
            body = build_notification(group, app_id=self._app_id)
        except (TypeError, ValueError) as exc:  # the SDK's ApiTypeError/ApiValueError included
            # Nothing was sent and the same input fails the same way on every attempt.
            refused = SendResult.failed(Reason.rejected, f"invalid notification: {describe(exc)}")
            return [finish(refused, (self._api_key,))] * len(group.messages)
        loop = asyncio.get_running_loop()
        try:
            call = loop.run_in_executor(self._executor, self._create, body)
            # urllib3's timeout does not cover name resolution, and a call may queue for a free thread:
            # this deadline bounds both. A call cancelled while queued never runs.
            reply, status, headers = await asyncio.wait_for(call, timeout=2 * self._timeout)
            recipients = [message.recipient.id for message in group.messages]
            results = classify_reply(reply, recipient_ids=recipients, http_status=status, headers=headers)
        except Exception as exc:  # the edge: whatever the SDK or urllib3 raised becomes a result
            results = [classify_error(exc)] * len(group.messages)
        return [finish(result, (self._api_key,)) for result in results]

    def _create(self, body: dict[str, Any]) -> tuple[Any, int, Any]:
        """POST the notification through the SDK's ``ApiClient`` (its auth, headers, urllib3 pool and errors).

        The generated ``create_notification`` endpoint builds a ``Notification`` model from the body and a
        response model from the reply; together ~0.5 ms of CPU per push (measured in bench/). The body is
        plain JSON built by ``build_notification``, and ``classify_reply`` reads the reply's JSON defensively,
        so the call goes to the endpoint's path with the endpoint's auth settings directly, and the reply body
        is read raw. A non-2xx reply still raises the SDK's ``ApiException``.
        """
        endpoint = self._api.create_notification_endpoint
        response = self._client.call_api(
            endpoint.settings["endpoint_path"],
            endpoint.settings["http_method"],
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body=body,
            auth_settings=endpoint.settings["auth"],
            _preload_content=False,
            _request_timeout=self._timeout,
            _check_type=False,
        )
        try:
            data = response.data
        finally:
            response.release_conn()
        try:
            reply = json.loads(data) if data else {}
        except ValueError as exc:  # as the SDK's deserializer would: an unparseable 2xx is not a verdict
            raise ApiTypeError(f"the reply is not JSON: {exc}") from exc
        return reply, response.status, response.headers

    async def aclose(self) -> None:
        """Wait for calls in flight (each bounded by the timeout), then drop the thread pool and connections."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._client.close()
        self._client.rest_client.pool_manager.clear()


def build_notification(group: MessageGroup, *, app_id: str) -> dict[str, Any]:
    """Return the JSON body of ``POST /notifications`` for ``group`` (the fields of the SDK's ``Notification``);
    raise TypeError/ValueError if its data cannot be sent as JSON.

    The members share the content; each member's language gets it too, so a device set to that language
    shows it rather than OneSignal's English fallback.
    """
    message = group.content
    headings = {"en": message.title}
    contents = {"en": message.body}
    for member in group.messages:
        language = onesignal_language(member.recipient.locale)
        if language and language != "en":
            headings[language] = message.title
            contents[language] = message.body
    # Only JSON types; a UUID or datetime in the event data travels as its string.
    data: dict[str, Any] = json.loads(json.dumps(dict(message.data), default=str, allow_nan=False))
    if message.action_url:
        data["action_url"] = message.action_url
    body: dict[str, Any] = {
        "app_id": app_id,
        "include_aliases": {"external_id": [member.recipient.id for member in group.messages]},
        "target_channel": "push",
        "headings": headings,
        "contents": contents,
        # Derived from the group's key (the delivery id of a message alone): a retried or redelivered send
        # of the same members is deduplicated by OneSignal.
        "idempotency_key": str(group.idempotency_uuid),
    }
    if data:
        body["data"] = data  # an explicit None would be sent as "data": null
    return body


def onesignal_language(locale: str | None) -> str | None:
    """Return OneSignal's language code for a locale (``de-AT`` -> ``de``, ``zh-TW`` -> ``zh-Hant``), or None."""
    if not locale:
        return None
    parts = locale.replace("_", "-").split("-")
    primary = parts[0].lower()
    if primary == "zh":
        return "zh-Hant" if {p.lower() for p in parts[1:]} & {"hant", "tw", "hk", "mo"} else "zh-Hans"
    return primary or None


def classify_reply(
    reply: Any, *, recipient_ids: Sequence[str], http_status: int = 200, headers: Any = None
) -> list[SendResult]:
    """Return each recipient's result for a 2xx reply (its JSON, or an SDK response model): sent with OneSignal's
    id, or failed(not_subscribed).

    No id: nobody got anything. An id: everyone did but the aliases OneSignal names as invalid.
    """
    if isinstance(reply, Mapping):  # the reply's JSON, as ``_create`` reads it
        notification_id, errors = reply.get("id"), reply.get("errors")
    else:  # an SDK response model; absent from an unexpected body: the model raises AttributeError
        notification_id, errors = getattr(reply, "id", None), getattr(reply, "errors", None)
    detail = json.dumps(errors, default=str) if errors else ""
    if not isinstance(notification_id, str) or not notification_id:
        nobody = SendResult.failed(Reason.not_subscribed, detail or "no notification created", http_status=http_status)
        return [nobody] * len(recipient_ids)
    invalid: set[str] = set()
    if isinstance(errors, Mapping):
        aliases, legacy = errors.get("invalid_aliases"), errors.get("invalid_external_user_ids")
        invalid.update((aliases.get("external_id") or []) if isinstance(aliases, Mapping) else [])
        invalid.update(legacy if isinstance(legacy, list) else [])
    if (header(headers, "Idempotent-Replayed") or "").lower() == "true":
        detail = f"replayed; {detail}" if detail else "replayed"
    sent = SendResult.sent(notification_id, http_status=http_status, detail=detail)
    unknown = SendResult.failed(Reason.not_subscribed, detail, http_status=http_status)
    return [unknown if recipient in invalid else sent for recipient in recipient_ids]


def classify_error(exc: BaseException) -> SendResult:
    """Return the result for an exception raised by a send: failed(rejected) for a refusal, else retry."""
    if isinstance(exc, AttributeError) and isinstance(exc.__context__, ApiException):
        # SDK quirk: on an SSL error it raises ApiException(status=0, body=None) and then trips over
        # ``e.body.decode()``; the AttributeError carries the real error as its context.
        exc = exc.__context__
    if isinstance(exc, ApiException):
        return _classify_status(exc)
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason  # only seen if retries are re-enabled; the reason says what went wrong
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before TimeoutError: it subclasses it
        return SendResult.retry(f"connection failed: {describe(exc)}")
    if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError):
        return SendResult.retry(f"timed out: {describe(exc)}")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return SendResult.retry(f"transport error: {describe(exc)}")
    # ApiTypeError on an unparseable 2xx, a shut-down pool, an SDK bug: nothing says it is permanent.
    return SendResult.retry(f"unexpected error: {describe(exc)}")


def _classify_status(exc: ApiException) -> SendResult:
    status = exc.status if isinstance(exc.status, int) else 0
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or "")
    reason = str(exc.reason or "")
    detail = f"{status} {reason}: {body}" if body else f"{status} {reason}"
    if status == 0:  # no HTTP exchange: an SSL failure or a request the SDK could not build
        return SendResult.retry("no HTTP exchange: " + (reason.replace("\n", ": ") or type(exc).__name__))
    if status in RETRYABLE_4XX or status >= 500:
        return SendResult.retry(detail, retry_after=retry_after_seconds(exc.headers), http_status=status)
    return SendResult.failed(Reason.rejected, detail, http_status=status)
