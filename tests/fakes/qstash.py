"""A loopback QStash emulator: the publish API here, the signed delivery side in ``qstash_delivery``.

The Starlette app answers ``POST /v2/publish/{url}``, ``POST /v2/batch``, ``POST /v2/schedules/{url}``
(upsert by ``Upstash-Schedule-Id``), ``GET|DELETE /v2/schedules[/{id}]`` and ``GET /v2/keys``, with
bearer-token auth (or ``?qstash_token=``) and ``Upstash-Deduplication-Id`` /
``Upstash-Content-Based-Deduplication`` dedup for ``dedup_window`` seconds (a duplicate gets 202 with
the first ``messageId`` and ``"deduplicated": true`` and is not enqueued). ``Upstash-Not-Before``
and ``Upstash-Delay`` are honoured, compressed by ``time_scale``. Accepted messages are delivered by
the ``DeliveryEngine`` on the uvicorn server's event loop (see ``qstash_delivery``).

Schedules are stored, never ticked: tests run one with ``fire_schedule``. ``fail_next(Fault...)``
scripts failures of the *API* (publish, batch, schedules), not of deliveries; a ``Fault.hang`` is
released when the emulator closes. Controls that touch delivery (``drain``, ``redeliver``,
``deliver_concurrently``, ``fire_schedule``) are coroutines to await from the test's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.base import FakeProvider, serve
from tests.fakes.qstash_delivery import (
    DEFAULT_RETRIES,
    FORWARD,
    DeliveryAttempt,
    DeliveryEngine,
    Message,
    b64,
    now_ms,
    parse_duration,
)

__all__ = ["DeliveryAttempt", "Message", "QStashEmulator", "parse_duration", "qstash_emulator"]

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]


class QStashEmulator(FakeProvider, DeliveryEngine):
    """The fixture's object: ``url``, ``token``, ``current_key``, ``next_key`` and the controls."""

    def __init__(
        self,
        *,
        token: str | None = None,
        time_scale: float = 0.001,
        max_wait: float = 2.0,
        attempt_timeout: float = 5.0,
        dedup_window: float = 600.0,
    ) -> None:
        FakeProvider.__init__(self)
        DeliveryEngine.__init__(self, time_scale=time_scale, max_wait=max_wait, attempt_timeout=attempt_timeout)
        self.url = ""
        self.token = token or f"qstash_test_{secrets.token_hex(8)}"
        self.dedup_window = dedup_window
        self.schedules: dict[str, dict[str, Any]] = {}
        self._dedup: dict[str, tuple[str, float]] = {}
        self._closing = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.app = Starlette(
            routes=[
                Route("/__emulator/attach", self._attach, methods=["GET"]),
                Route("/v2/publish/{destination:path}", self._guarded(self._publish), methods=["POST"]),
                Route("/v2/batch", self._guarded(self._batch), methods=["POST"]),
                Route("/v2/schedules", self._guarded(self._list_schedules), methods=["GET"]),
                Route("/v2/schedules/{destination:path}", self._guarded(self._create_schedule), methods=["POST"]),
                Route("/v2/schedules/{schedule_id}", self._guarded(self._schedule), methods=["GET", "DELETE"]),
                Route("/v2/keys", self._guarded(self._keys), methods=["GET"]),
            ]
        )

    # ----- API (runs on the server's loop) --------------------------------------------------------

    async def _attach(self, request: Request) -> Response:
        self._loop = asyncio.get_running_loop()
        await self.start_engine()
        return JSONResponse({"ok": True})

    def _guarded(self, handler: Handler) -> Handler:
        """Record the request, then refuse a bad token (401), play a scripted fault, or handle it."""

        async def guarded(request: Request) -> Response:
            await self.record(request)
            auth = request.headers.get("authorization", "")
            supplied = auth[7:] if auth.startswith("Bearer ") else request.query_params.get("qstash_token")
            if supplied is None or not secrets.compare_digest(supplied, self.token):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            with self._lock:
                fault = self._faults.popleft() if self._faults else None
            if fault is None:
                return await handler(request)
            if fault.hang_seconds:  # interruptible, so a hung API does not hold up teardown
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), fault.hang_seconds)
            if isinstance(fault.body, str | bytes):
                return Response(fault.body, status_code=fault.status, headers=fault.headers)
            return JSONResponse(fault.body, status_code=fault.status, headers=fault.headers)

        return guarded

    @staticmethod
    def _destination(request: Request) -> str:
        destination: str = request.path_params["destination"]
        return f"{destination}?{request.url.query}" if request.url.query else destination

    async def _publish(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            reply, status = self._accept(self._destination(request), headers, await request.body())
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(reply, status_code=status)

    async def _batch(self, request: Request) -> Response:
        try:
            items = json.loads(await request.body())
            if not isinstance(items, list):
                raise ValueError("batch body must be a JSON array")
            replies = []
            for item in items:
                headers = {k.lower(): str(v) for k, v in (item.get("headers") or {}).items()}
                body = (item.get("body") or "").encode()
                replies.append(self._accept(str(item.get("destination", "")), headers, body)[0])
        except (ValueError, AttributeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(replies)

    def _accept(
        self, destination: str, headers: dict[str, str], body: bytes, schedule_id: str | None = None
    ) -> tuple[dict[str, Any], int]:
        """Enqueue one message (or find its duplicate); returns (reply JSON, HTTP status)."""
        if not destination.startswith(("http://", "https://")):
            raise ValueError(f"invalid destination {destination!r}: the emulator supports URLs only")
        dedup_id = headers.get("upstash-deduplication-id")
        if dedup_id is None and headers.get("upstash-content-based-deduplication", "").lower() == "true":
            forwarded = sorted((k, v) for k, v in headers.items() if k.startswith(FORWARD))
            material = json.dumps([destination, b64(body), headers.get("content-type"), forwarded])
            dedup_id = hashlib.sha256(material.encode()).hexdigest()
        now = time.monotonic()
        if dedup_id is not None and (seen := self._dedup.get(dedup_id)) is not None and seen[1] > now:
            return {"messageId": seen[0], "deduplicated": True}, 202
        created_ms = now_ms()
        delay, not_before_ms = 0.0, created_ms
        if "upstash-not-before" in headers:
            not_before_ms = int(float(headers["upstash-not-before"]) * 1000)
            delay = max(0.0, not_before_ms - created_ms) / 1000
        elif "upstash-delay" in headers:
            parsed = parse_duration(headers["upstash-delay"])
            if parsed is None:
                raise ValueError(f"invalid Upstash-Delay {headers['upstash-delay']!r}")
            delay, not_before_ms = parsed, created_ms + int(parsed * 1000)
        message = Message(
            id=f"msg_{secrets.token_urlsafe(12)}",
            destination=destination,
            body=body,
            headers=headers,
            max_retries=int(headers.get("upstash-retries", DEFAULT_RETRIES)),
            delay=self._scaled(delay),
            created_ms=created_ms,
            not_before_ms=not_before_ms,
            schedule_id=schedule_id,
        )
        if dedup_id is not None:
            self._dedup[dedup_id] = (message.id, now + self.dedup_window)
        self.enqueue(message)
        return {"messageId": message.id}, 201

    async def _create_schedule(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in ("authorization", "host")}
        if "upstash-cron" not in headers:
            return JSONResponse({"error": "Upstash-Cron header is required"}, status_code=400)
        schedule_id = headers.get("upstash-schedule-id") or f"scd_{secrets.token_urlsafe(12)}"
        previous = self.schedules.get(schedule_id)
        self.schedules[schedule_id] = {
            "scheduleId": schedule_id,
            "destination": self._destination(request),
            "cron": headers["upstash-cron"],
            "createdAt": previous["createdAt"] if previous else now_ms(),
            "method": headers.get("upstash-method", "POST"),
            "header": {k[len(FORWARD) :]: [v] for k, v in headers.items() if k.startswith(FORWARD)},
            "body": (await request.body()).decode(),
            "retries": int(headers.get("upstash-retries", DEFAULT_RETRIES)),
            "failureCallback": headers.get("upstash-failure-callback"),
            "isPaused": False,
            "_headers": headers,
        }
        return JSONResponse({"scheduleId": schedule_id})

    @staticmethod
    def _public(schedule: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in schedule.items() if not k.startswith("_") and v is not None}

    async def _list_schedules(self, request: Request) -> Response:
        return JSONResponse([self._public(s) for s in self.schedules.values()])

    async def _schedule(self, request: Request) -> Response:
        schedule_id = request.path_params["schedule_id"]
        if schedule_id not in self.schedules:
            return JSONResponse({"error": "schedule not found"}, status_code=404)
        if request.method == "DELETE":
            del self.schedules[schedule_id]
            return Response(status_code=200)
        return JSONResponse(self._public(self.schedules[schedule_id]))

    async def _keys(self, request: Request) -> Response:
        return JSONResponse({"current": self.current_key, "next": self.next_key})

    # ----- test controls (await from the test's loop) --------------------------------------------

    async def _on_server(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "emulator not attached"
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until no message (or failure callback) is pending.

        Raises TimeoutError if still busy, and re-raises the first error a delivery task hit (a bug
        in the emulator must fail the test, not vanish in the server thread).
        """
        await self._on_server(self.wait_idle(timeout))
        if self.task_errors:
            raise RuntimeError("a QStash emulator delivery task failed") from self.task_errors[0]

    async def redeliver(self, message_id: str) -> DeliveryAttempt:
        """Deliver ``message_id`` once more, same id and retry count (QStash is at-least-once)."""
        message = self.messages[message_id]
        return await self._on_server(self.attempt(message, message.retried))

    async def deliver_concurrently(self, message_id: str, n: int) -> list[DeliveryAttempt]:
        """Deliver ``message_id`` ``n`` times at once (a race between duplicate deliveries)."""
        message = self.messages[message_id]

        async def burst() -> list[DeliveryAttempt]:
            return list(await asyncio.gather(*(self.attempt(message, message.retried) for _ in range(n))))

        return await self._on_server(burst())

    async def fire_schedule(self, schedule_id: str) -> str:
        """Run a stored schedule once now (delivery carries ``Upstash-Schedule-Id``); returns the message id."""
        schedule = self.schedules[schedule_id]
        headers = {k: v for k, v in schedule["_headers"].items() if k not in ("upstash-cron", "upstash-schedule-id")}

        async def fire() -> str:
            reply, _ = self._accept(schedule["destination"], headers, schedule["body"].encode(), schedule_id)
            return str(reply["messageId"])

        return await self._on_server(fire())

    def attach(self, url: str) -> None:
        """Bind to the running server at ``url``: its event loop becomes the delivery loop."""
        self.url = url
        httpx.get(f"{url}/__emulator/attach", trust_env=False, timeout=5).raise_for_status()

    def close(self) -> None:
        """Release hung API requests, cancel pending deliveries, close the delivery client."""

        async def shutdown() -> None:
            self._closing.set()
            await self.stop_engine()

        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)


@pytest.fixture
def qstash_emulator() -> Iterator[QStashEmulator]:
    """A running QStash emulator (see the module docstrings here and in ``qstash_delivery``)."""
    emulator = QStashEmulator()
    with serve(emulator.app) as served:
        emulator.attach(served.url)
        try:
            yield emulator
        finally:
            emulator.close()
