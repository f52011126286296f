"""Dispatch through Upstash QStash: one signed HTTP call back to us per delivery, or per send group.

``QStashDispatcher.dispatch`` publishes one message per item -- to ``{public_url}/v1/qstash/deliveries/{id}``
for a delivery alone, to ``{public_url}/v1/qstash/groups/{id}`` (its body naming the members) for a send
group -- with the batch API when there are several, deduplicated by ``{id}.{dispatch generation}``, with our
retry budget and failure callback. QStash then owns the retry loop. The dispatcher never raises for
transport or HTTP trouble: the rows stay ``queued`` and the sweep (``/v1/qstash/cron/sweep``) re-dispatches
them, so one warning line is all a failure costs.

``sync_schedules`` creates or updates the cron schedules that drive the sweep and retention jobs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from qstash import AsyncQStash
from qstash.errors import QStashError
from qstash.message import BatchJsonRequest, BatchResponse, PublishResponse

from notifier.channels.edge import describe, redact
from notifier.config import Settings
from notifier.errors import ConfigurationError
from notifier.types import DispatchItem

if TYPE_CHECKING:
    from notifier.dispatch.base import Dispatcher

log = logging.getLogger(__name__)

BATCH_SIZE = 100
"""Messages per ``/v2/batch`` request; larger dispatches are split into chunks of this size."""

FAILURE_CALLBACK_RETRIES = 12
"""How often QStash retries a failure callback (its default backoff spreads 12 over days): QStash's giving up on a
message must reach the service even across a long outage, or the delivery would wait for a sweep that cannot
know the message is spent."""

SWEEP_SCHEDULE_ID = "notifier-sweep"
RETENTION_SCHEDULE_ID = "notifier-retention"
SWEEP_CRON = "* * * * *"
RETENTION_CRON = "17 * * * *"  # hourly: each call is bounded, so a busy deployment keeps up

# What a publish can fail with: the SDK wraps HTTP statuses in QStashError but lets httpx's
# transport errors through unwrapped; our own deadline raises TimeoutError.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    QStashError,
    httpx.HTTPError,
    TimeoutError,
    OSError,
    ValueError,
    KeyError,
)


def make_client(*, token: str, base_url: str, timeout: float) -> AsyncQStash:
    """An ``AsyncQStash`` whose every call is bounded by ``timeout`` and never retried by the SDK.

    The SDK has no timeout argument: its ``httpx.AsyncClient`` is built with a 600 s read
    timeout, and its default retry loop (5 retries, sleeping even after the last failure) turns
    one hung request into ~40 s (measured against a hung server). ``retry=False`` removes the loop; the timeout
    can only be changed on the private ``client.http._client`` -- this is the one place that
    reaches into it (``close_client`` below is the other half). If an SDK upgrade renames the
    attribute this raises at construction, not silently at the first hang.
    """
    client = AsyncQStash(token, retry=False, base_url=base_url)
    transport: httpx.AsyncClient = client.http._client
    transport.timeout = httpx.Timeout(timeout)
    return client


async def close_client(client: AsyncQStash) -> None:
    """Close the SDK's HTTP client (``AsyncQStash`` has no ``aclose`` of its own)."""
    transport: httpx.AsyncClient = client.http._client
    await transport.aclose()


class QStashDispatcher:
    """Publishes committed deliveries to QStash, which calls ``/v1/qstash/deliveries/{id}`` back.

    Counters (``published``, ``deduplicated``, ``failed``) accumulate over the dispatcher's life.
    """

    name = "qstash"

    def __init__(self, *, token: str, base_url: str, public_url: str, max_retries: int, timeout: float = 5.0) -> None:
        if not token:
            raise ConfigurationError("the QStash dispatcher needs QSTASH_TOKEN")
        self._token = token
        self._timeout = timeout
        self._public_url = public_url.rstrip("/")
        self._max_retries = max_retries
        self._client = make_client(token=token, base_url=base_url, timeout=timeout)
        self.published = 0
        self.deduplicated = 0
        self.failed = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> QStashDispatcher:
        if settings.qstash_token is None:
            raise ConfigurationError("NOTIFIER_DISPATCHER=qstash needs QSTASH_TOKEN")
        return cls(
            token=settings.qstash_token.get_secret_value(),
            base_url=settings.qstash_url,
            public_url=settings.public_url,
            max_retries=settings.max_retries,
            timeout=settings.provider_timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"QStashDispatcher(public_url={self._public_url!r}, max_retries={self._max_retries})"

    def destination(self, item: DispatchItem) -> str:
        """Where QStash delivers ``item``: the group's route for a send group, else the delivery's."""
        if item.send_group is not None:
            return f"{self._public_url}/v1/qstash/groups/{item.send_group}"
        return f"{self._public_url}/v1/qstash/deliveries/{item.delivery_id}"

    @property
    def failure_callback(self) -> str:
        return f"{self._public_url}/v1/qstash/failures"

    async def start(self) -> None:
        """Nothing to start: QStash calls us."""

    async def aclose(self) -> None:
        await close_client(self._client)

    async def dispatch(self, items: Sequence[DispatchItem]) -> int:
        """Publish one QStash message per item; return how many QStash accepted. Never raises.

        Chunks are published in order and the first failure stops the rest (one warning line): QStash is
        likely down, and every unpublished row is still ``queued`` for the sweep. Messages already accepted
        are deduplicated (same unit, same generation) when the sweep publishes them again.
        """
        if not items:
            return 0
        now = time.time()
        started = time.monotonic()
        published = 0
        try:
            if len(items) == 1:
                published += await self._publish_one(items[0], now)
            else:
                for start in range(0, len(items), BATCH_SIZE):
                    published += await self._publish_batch(items[start : start + BATCH_SIZE], now)
        except PUBLISH_ERRORS as exc:
            unpublished = len(items) - published
            self.failed += unpublished
            log.warning(
                "qstash dispatch failed after %.2fs: %d of %d published, %d left queued for the sweep (%s)",
                time.monotonic() - started,
                published,
                len(items),
                unpublished,
                redact(describe(exc), (self._token,))[:300],
            )
        return published

    def _options(self, item: DispatchItem, now: float) -> dict[str, Any]:
        body: dict[str, Any] = (
            {"group_id": str(item.send_group), "deliveries": [str(i) for i in item.members]}
            if item.send_group is not None
            else {"delivery_id": str(item.delivery_id)}
        )
        options: dict[str, Any] = {
            "url": self.destination(item),
            "body": {**body, "generation": item.generation},
            # The unit and its dispatch generation: a re-publish of the same intent is dropped by QStash for
            # 10 minutes, a deliberate re-dispatch (a new generation) is not.
            "deduplication_id": f"{item.unit}.{item.generation}",
            "retries": self._max_retries,
            "failure_callback": self.failure_callback,
            "failure_callback_headers": {"Retries": str(FAILURE_CALLBACK_RETRIES)},
        }
        not_before = _unix_seconds(item.not_before)
        if not_before is not None and not_before > now:
            options["not_before"] = math.ceil(not_before)
        return options

    async def _publish_one(self, item: DispatchItem, now: float) -> int:
        async with asyncio.timeout(self._timeout):
            response = await _once_more_if_stale(lambda: self._client.message.publish_json(**self._options(item, now)))
        return self._count([response])

    async def _publish_batch(self, chunk: Sequence[DispatchItem], now: float) -> int:
        messages = [BatchJsonRequest(**self._options(item, now)) for item in chunk]  # type: ignore[typeddict-item]
        async with asyncio.timeout(self._timeout):
            responses = await _once_more_if_stale(lambda: self._client.message.batch_json(messages))
        return self._count(responses)

    def _count(self, responses: Sequence[object]) -> int:
        """Count accepted messages (and which QStash deduplicated); return how many were accepted."""
        for response in responses:
            self.published += 1
            if isinstance(response, PublishResponse | BatchResponse) and response.deduplicated:
                self.deduplicated += 1
        return len(responses)


_Answer = TypeVar("_Answer")

# How a request fails on a pooled keep-alive connection that the server closed as it was being reused (its idle
# timeout racing the client's): the connection drops before any answer. Seen in the bench as "0 of 2 published
# (ReadError)", two deliveries then waiting for the sweep. Sent again, the request gets a new connection; a
# message that did reach QStash the first time is deduplicated by its id.
_STALE_CONNECTION = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


async def _once_more_if_stale(publish: Callable[[], Awaitable[_Answer]]) -> _Answer:
    try:
        return await publish()
    except _STALE_CONNECTION:
        return await publish()


def _unix_seconds(moment: dt.datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # naive timestamps in this service are UTC
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


async def sync_schedules(settings: Settings) -> list[str]:
    """Create or update the cron schedules (fixed ids, so running it again changes nothing).

    Returns the schedule ids QStash reports. Raises ``ConfigurationError`` without a token and
    lets QStash/transport errors propagate: this is an operator command, it must fail loudly.
    Every call is bounded by ``NOTIFIER_PROVIDER_TIMEOUT_SECONDS``.
    """
    if settings.qstash_token is None:
        raise ConfigurationError("`notifier schedules sync` needs QSTASH_TOKEN")
    public_url = settings.public_url.rstrip("/")
    bound = settings.provider_timeout_seconds
    client = make_client(token=settings.qstash_token.get_secret_value(), base_url=settings.qstash_url, timeout=bound)
    jobs = [
        (SWEEP_SCHEDULE_ID, f"{public_url}/v1/qstash/cron/sweep", SWEEP_CRON, 0),
        (RETENTION_SCHEDULE_ID, f"{public_url}/v1/qstash/cron/retention", RETENTION_CRON, settings.max_retries),
    ]
    ids: list[str] = []
    try:
        for schedule_id, destination, cron, retries in jobs:
            # The sweep runs every minute, so a failed run is simply the next run; no retries.
            async with asyncio.timeout(bound):
                created = await client.schedule.create(
                    destination=destination,
                    cron=cron,
                    body=json.dumps({"job": schedule_id}),
                    content_type="application/json",
                    retries=retries,
                    schedule_id=schedule_id,
                )
            ids.append(str(created))
            log.info("qstash schedule %s synced: %s -> %s", created, cron, destination)
    finally:
        await close_client(client)
    return ids


if TYPE_CHECKING:

    def _conforms(dispatcher: QStashDispatcher) -> Dispatcher:
        return dispatcher
