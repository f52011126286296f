"""Email through a Knock workflow (``POST /v1/workflows/{key}/trigger``) with the official async SDK.

One ``send`` is one HTTP attempt: the SDK's own retries are off (``max_retries=0``) because QStash or
the local dispatcher owns retries (SDK retries would multiply with theirs), and every attempt of a delivery carries the
same ``Idempotency-Key`` (the delivery id), so Knock starts at most one workflow run per delivery
within its 24 h replay window however often we retry.

Classification, all in ``classify_knock_error``:

==============================================  =========================================
Knock / SDK answer                              SendResult
==============================================  =========================================
2xx ``{"workflow_run_id": ...}``                sent(workflow_run_id)
408, 409, 429 (``APIStatusError``)              retry, retry_after from ``retry-after-ms``
                                                or ``Retry-After`` (seconds or HTTP date)
≥ 500 (``InternalServerError``)                 retry (same retry_after rule)
any other 4xx (400, 401, 403, 404, 422, ...)    failed(rejected)
``APITimeoutError`` / ``APIConnectionError``    retry
raw ``httpx`` errors, anything unexpected       retry, exception class named in detail
``APIResponseValidationError`` (strict only)    sent(None): the provider answered 2xx
==============================================  =========================================
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import knockapi
from knockapi._base_client import make_request_options
from knockapi._utils import path_template
from knockapi.types import InlineIdentifyUserRequestParam, WorkflowTriggerResponse

from notifier.channels.base import Message, MessageGroup, SendResult
from notifier.channels.edge import finish, retry_after_seconds
from notifier.types import ChannelName, Reason

if TYPE_CHECKING:
    from notifier.config import Settings

# 408: the request timed out at Knock. 429: rate limited.
# 409: decided as retryable. Knock documents only that reusing an Idempotency-Key "with parameters
# that don't match" is an error, not its status; draft-ietf-httpapi-idempotency-key-header gives
# 409 to "the original request with this key is still being processed" (and 422 to a mismatch),
# and the Stainless SDK retries 409 as a lock conflict. Our key is the delivery id and the payload
# is rendered from the delivery, so an in-flight duplicate (an attempt racing a redelivery) is the
# 409 we expect; retrying is then safe (the key prevents a second run) and returns the original
# answer. Should Knock use 409 for a mismatch instead, the retries run out and the delivery fails
# as retries_exhausted: bounded cost, and never a duplicate email.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def _body_text(body: object) -> str:
    if isinstance(body, str):
        return body
    try:
        return json.dumps(body, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(body)


def classify_knock_error(exc: Exception) -> SendResult:
    """Translate anything ``AsyncKnock.workflows.trigger`` raised into a SendResult (never raises)."""
    if isinstance(exc, knockapi.APIStatusError):
        status = exc.status_code
        detail = f"knock answered {status}: {_body_text(exc.body)}"
        if status in RETRYABLE_STATUSES or status >= 500 or status < 400:
            return SendResult.retry(detail, retry_after=retry_after_seconds(exc.response.headers), http_status=status)
        return SendResult.failed(Reason.rejected, detail, http_status=status)
    if isinstance(exc, knockapi.APIResponseValidationError):
        # Raised only with _strict_response_validation (off here), after a 2xx: the run was accepted.
        return SendResult.sent(None, http_status=exc.status_code, detail=f"unexpected reply: {_body_text(exc.body)}")
    if isinstance(exc, knockapi.APITimeoutError):
        return SendResult.retry(f"knock timed out ({type(exc.__cause__).__name__})")
    if isinstance(exc, knockapi.APIConnectionError):
        return SendResult.retry(f"knock unreachable: {type(exc.__cause__).__name__}: {exc.__cause__}")
    if isinstance(exc, httpx.HTTPError):  # the SDK wraps these today; stay safe if one slips through
        return SendResult.retry(f"knock transport error: {type(exc).__name__}: {exc}")
    return SendResult.retry(f"unexpected {type(exc).__name__}: {exc}")


class KnockEmail:
    """The email channel when Knock is configured: one workflow trigger per send group (or delivery)."""

    channel: ClassVar[ChannelName] = ChannelName.email
    provider: ClassVar[str] = "knock"
    needs_email: ClassVar[bool] = True
    group_limit: ClassVar[int] = 1000  # recipients one trigger may name
    # Knock replays a trigger's Idempotency-Key for 24 hours (https://docs.knock.app/api-reference/overview/idempotent-requests).
    dedupe_window: ClassVar[dt.timedelta | None] = dt.timedelta(hours=24)

    def __init__(self, *, api_key: str, base_url: str, workflow_prefix: str, timeout: float) -> None:
        self._workflow_prefix = workflow_prefix
        self._api_key = api_key
        self._client = knockapi.AsyncKnock(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)

    @classmethod
    def from_settings(cls, settings: Settings) -> KnockEmail | None:
        """Return a channel built from KNOCK_* settings, or None when no API key is configured."""
        key = settings.knock_api_key.get_secret_value() if settings.knock_api_key is not None else ""
        if not key:
            return None
        return cls(
            api_key=key,
            base_url=settings.knock_base_url,
            workflow_prefix=settings.knock_workflow_prefix,
            timeout=settings.provider_timeout_seconds,
        )

    def workflow_key(self, event_type: str) -> str:
        """Return the Knock workflow for an event type: ``booking.confirmed`` → ``<prefix>booking-confirmed``."""
        return self._workflow_prefix + event_type.replace(".", "-")

    @staticmethod
    def trigger_data(message: Message) -> dict[str, Any]:
        """Return the workflow ``data``: the event's data, then the rendered fields (which win on a clash)."""
        data: dict[str, Any] = {**message.data, "title": message.title, "body": message.body}
        if message.html is not None:
            data["html"] = message.html
        if message.action_url is not None:
            data["action_url"] = message.action_url
        return data

    async def send(self, message: Message) -> SendResult:
        """Trigger the workflow once for the message's recipient and classify Knock's answer."""
        [result] = await self.send_group(MessageGroup.alone(message))
        return result

    async def send_group(self, group: MessageGroup) -> list[SendResult]:
        """Trigger the workflow once for every member of ``group`` (one run, its recipients inline).

        The group's key is the trigger's ``Idempotency-Key``: a retry starts no second run. Knock answers
        for the whole trigger, so every member shares the outcome; a member without an email address is
        refused alone, before the call.
        """
        results: list[SendResult | None] = [None] * len(group.messages)
        users: list[InlineIdentifyUserRequestParam] = []
        for index, message in enumerate(group.messages):
            recipient = message.recipient
            if not recipient.email:
                results[index] = SendResult.failed(Reason.rejected, f"recipient {recipient.id!r} has no email address")
                continue
            users.append(_inline_user(message))
        if users:
            shared = await self._trigger(group, users)
            results = [shared if result is None else result for result in results]
        return [finish(result, (self._api_key,)) for result in results if result is not None]

    async def _trigger(self, group: MessageGroup, users: list[InlineIdentifyUserRequestParam]) -> SendResult:
        message = group.content
        # What ``client.workflows.trigger`` sends, posted with the SDK's client without its parameter transform:
        # that walks the body against the SDK's typed dicts (to rename and format fields), which leaves these
        # plain strings as they are and cost ~220 us of CPU for one recipient, ~3.5 ms for twenty.
        body = {"recipients": users, "data": self.trigger_data(message)}
        try:
            response = await self._client.post(
                path_template("/v1/workflows/{key}/trigger", key=self.workflow_key(message.event_type)),
                body=body,
                options=make_request_options(idempotency_key=group.key),
                cast_to=WorkflowTriggerResponse,
            )
        except Exception as exc:  # the one edge where provider faults become a SendResult
            return classify_knock_error(exc)
        # A 2xx whose body is not the documented JSON comes back as a str (or without the field).
        run_id = getattr(response, "workflow_run_id", None)
        return SendResult.sent(run_id if isinstance(run_id, str) else None, detail="" if run_id else repr(response))

    async def aclose(self) -> None:
        await self._client.close()


def _inline_user(message: Message) -> InlineIdentifyUserRequestParam:
    """The recipient as Knock's inline user (Knock upserts it with the trigger)."""
    recipient = message.recipient
    user: InlineIdentifyUserRequestParam = {"id": recipient.id, "email": recipient.email or ""}
    if recipient.name is not None:
        user["name"] = recipient.name
    if recipient.locale is not None:
        user["locale"] = recipient.locale
    if recipient.timezone is not None:
        user["timezone"] = recipient.timezone
    return user
