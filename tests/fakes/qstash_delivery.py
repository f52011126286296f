"""The delivery side of the QStash emulator: signing, attempts, retries, DLQ, failure callbacks.

``DeliveryEngine`` runs on the emulator server's event loop. It delivers each accepted ``Message``
to its destination signed like QStash (``Upstash-Signature`` HS256 JWT with the current key:
``iss``, ``sub`` = URL, ``exp`` +5 min, ``nbf``/``iat`` = now floored -- never ahead of the
receiver -- ``jti``, ``body`` = base64url(SHA-256(raw body))), with
``Upstash-Message-Id`` (stable across retries), ``Upstash-Retried`` and the forwarded headers.
Non-2xx, timeouts and refused connections are retried up to the message's ``Upstash-Retries`` with
QStash's backoff ``min(1 day, e^(2.5 n))`` or the destination's ``Retry-After`` hint; 489 with
``Upstash-NonRetryable-Error: true`` stops at once. A failed message goes to the DLQ and, when
asked, its failure callback (a signed message of its own) gets QStash's callback JSON.

Every emulated wait is multiplied by ``time_scale`` and capped at ``max_wait`` real seconds; a failure
callback's retries may be capped apart (``callback_max_wait``), as QStash spreads them over days.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import functools
import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

DEFAULT_RETRIES = 3
DAY = 86400.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
FORWARD = "upstash-forward-"
_FAILURE_FORWARD = "upstash-failure-callback-forward-"


def parse_duration(value: str) -> float | None:
    """Seconds in ``"30"``, ``"1d10h30m"``, ``"6m5s"``, ``"250ms"`` or an RFC 1123 date; None if neither."""
    value = value.strip()
    with contextlib.suppress(ValueError):
        return float(value)
    if value and _DURATION.sub("", value) == "":
        return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(value))
    with contextlib.suppress(TypeError, ValueError):
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    return None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _multi(headers: dict[str, str]) -> dict[str, list[str]]:
    return {k: [v] for k, v in headers.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Message:
    """One accepted message. ``retried`` counts the retries made so far."""

    id: str
    destination: str
    body: bytes
    headers: dict[str, str]  # the publish request's headers, lower-case names
    max_retries: int
    delay: float  # real seconds before the first attempt (already scaled)
    created_ms: int
    not_before_ms: int
    schedule_id: str | None = None
    is_failure_callback: bool = False
    retried: int = 0
    state: str = "CREATED"  # CREATED -> DELIVERED | FAILED
    dlq_id: str | None = None

    @property
    def method(self) -> str:
        return self.headers.get("upstash-method", "POST").upper()

    @property
    def failure_callback(self) -> str | None:
        return None if self.is_failure_callback else self.headers.get("upstash-failure-callback")


@dataclass(frozen=True)
class DeliveryAttempt:
    """One HTTP call the emulator made to a destination (or a failure-callback URL)."""

    message_id: str
    url: str
    retried: int
    status: int | None  # None: timeout or connection failure (see ``error``)
    headers: dict[str, str]  # what the emulator sent
    body: bytes
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""
    error: str | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def non_retryable(self) -> bool:
        return self.status == 489 and self.response_headers.get("upstash-nonretryable-error", "").lower() == "true"


class DeliveryEngine:
    """Delivers messages; owns the signing keys, the delivery log, the DLQ and the pending tasks."""

    def __init__(self, *, time_scale: float = 0.001, max_wait: float = 2.0, attempt_timeout: float = 5.0) -> None:
        self.current_key = f"sig_current_{secrets.token_hex(16)}"  # >= 32 bytes, or PyJWT warns
        self.next_key = f"sig_next_{secrets.token_hex(16)}"
        self.time_scale, self.max_wait, self.attempt_timeout = time_scale, max_wait, attempt_timeout
        self.callback_max_wait: float | None = None  # None: failure callbacks' retries are capped at max_wait too
        self.messages: dict[str, Message] = {}
        self.deliveries_log: list[DeliveryAttempt] = []
        self.dlq: list[dict[str, Any]] = []
        self.failure_callbacks: list[dict[str, Any]] = []  # report bodies, in the order they were sent
        self.task_errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None

    def sign(
        self,
        body: bytes | str,
        url: str,
        *,
        key: str | None = None,
        exp_delta: int = 300,
        nbf_delta: int = 0,
        iat_delta: int = 0,
        iss: str | None = "Upstash",
        **claims: Any,
    ) -> str:
        """An ``Upstash-Signature`` for ``body`` sent to ``url``; override key/claims to forge one.

        A claim passed as None (``iss=None``, ``sub=None``) is left out of the token.
        """
        raw = body.encode() if isinstance(body, str) else body
        now = int(time.time())  # whole seconds, floored: iat/nbf never ahead of the receiver (P9)
        payload: dict[str, Any] = {
            "iss": iss,
            "sub": url,
            "exp": now + exp_delta,
            "nbf": now + nbf_delta,
            "iat": now + iat_delta,
            "jti": f"jwt_{secrets.token_hex(12)}",
            "body": base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).decode(),
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.current_key, algorithm="HS256")

    def rotate_keys(self) -> None:
        """QStash key rotation: the next key becomes current, a new next key is made."""
        self.current_key, self.next_key = self.next_key, f"sig_next_{secrets.token_hex(16)}"

    # ----- delivery (on the server's loop) -------------------------------------------------------

    def _scaled(self, seconds: float, *, cap: float | None = None) -> float:
        return min(max(0.0, seconds) * self.time_scale, self.max_wait if cap is None else cap)

    def enqueue(self, message: Message) -> None:
        self.messages[message.id] = message
        task = asyncio.get_running_loop().create_task(self._run(message), name=f"qstash-{message.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.task_errors.append(task.exception())  # type: ignore[arg-type]

    def _delivery_headers(self, message: Message, retried: int) -> dict[str, str]:
        headers = {
            "Upstash-Signature": self.sign(message.body, message.destination),
            "Upstash-Message-Id": message.id,
            "Upstash-Retried": str(retried),
            "Upstash-Caller-Ip": "127.0.0.1",
            "User-Agent": "Upstash-QStash",
        }
        if "content-type" in message.headers:
            headers["Content-Type"] = message.headers["content-type"]
        if message.schedule_id:
            headers["Upstash-Schedule-Id"] = message.schedule_id
        headers.update({k[len(FORWARD) :]: v for k, v in message.headers.items() if k.startswith(FORWARD)})
        return headers

    async def attempt(self, message: Message, retried: int) -> DeliveryAttempt:
        assert self._http is not None, "emulator not attached"
        headers = self._delivery_headers(message, retried)
        timeout = parse_duration(message.headers.get("upstash-timeout", "")) or self.attempt_timeout
        attempt = functools.partial(
            DeliveryAttempt, message_id=message.id, url=message.destination, retried=retried, headers=headers
        )
        try:
            response = await self._http.request(
                message.method, message.destination, content=message.body, headers=headers, timeout=timeout
            )
        except httpx.HTTPError as exc:
            result = attempt(body=message.body, status=None, error=f"{type(exc).__name__}: {exc}")
        else:
            result = attempt(
                body=message.body,
                status=response.status_code,
                response_headers={k.lower(): v for k, v in response.headers.items()},
                response_body=response.content,
            )
        self.deliveries_log.append(result)
        return result

    def _retry_delay(self, message: Message, attempt: DeliveryAttempt) -> float:
        """Real seconds before the next retry: the emulated wait, scaled and capped (apart for failure callbacks)."""
        cap = self.callback_max_wait if message.is_failure_callback else None
        return self._scaled(self._emulated_retry_wait(message, attempt), cap=cap)

    @staticmethod
    def _emulated_retry_wait(message: Message, attempt: DeliveryAttempt) -> float:
        """Emulated seconds before the next retry: the destination's hint, the custom expression, or e^(2.5n)."""
        for name in ("retry-after", "x-ratelimit-reset", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            hint = parse_duration(attempt.response_headers.get(name, ""))
            if hint is not None and 0 <= hint <= DAY:
                return hint
        n = message.retried
        if expression := message.headers.get("upstash-retry-delay"):
            names = {"retried": n, "pow": pow, "exp": math.exp, "sqrt": math.sqrt, "abs": abs, "floor": math.floor}
            names |= {"ceil": math.ceil, "round": round, "min": min, "max": max}
            return float(eval(expression, {"__builtins__": {}}, names)) / 1000
        return min(DAY, math.exp(2.5 * (n + 1)))

    async def _run(self, message: Message) -> None:
        await asyncio.sleep(message.delay)
        while True:
            attempt = await self.attempt(message, message.retried)
            if attempt.ok:
                message.state = "DELIVERED"
                return
            if attempt.non_retryable or message.retried >= message.max_retries:
                self._fail(message, attempt)
                return
            await asyncio.sleep(self._retry_delay(message, attempt))
            message.retried += 1

    def _fail(self, message: Message, attempt: DeliveryAttempt) -> None:
        message.state = "FAILED"
        message.dlq_id = f"{now_ms()}-{len(self.dlq)}"
        source_headers = {k: v for k, v in attempt.headers.items() if k != "Upstash-Signature"}
        report: dict[str, Any] = {
            "status": attempt.status or 0,
            "header": _multi(attempt.response_headers),
            "body": b64(attempt.response_body),
            "retried": message.retried,
            "maxRetries": message.max_retries,
            "dlqId": message.dlq_id,
            "sourceMessageId": message.id,
            "url": message.destination,
            "method": message.method,
            "sourceHeader": _multi(source_headers),
            "sourceBody": b64(message.body),
            "notBefore": str(message.not_before_ms),
            "createdAt": str(message.created_ms),
            "callerIP": "127.0.0.1",
        }
        if message.schedule_id:
            report["scheduleId"] = message.schedule_id
        self.dlq.append({**report, "messageId": message.id})
        callback = message.failure_callback
        if callback is None:
            return
        self.failure_callbacks.append(report)
        headers = {"content-type": "application/json"}
        headers |= {
            FORWARD + k[len(_FAILURE_FORWARD) :]: v
            for k, v in message.headers.items()
            if k.startswith(_FAILURE_FORWARD)
        }
        if "upstash-failure-callback-timeout" in message.headers:
            headers["upstash-timeout"] = message.headers["upstash-failure-callback-timeout"]
        created_ms = now_ms()
        self.enqueue(
            Message(
                id=f"msg_{secrets.token_urlsafe(12)}",
                destination=callback,
                body=json.dumps(report).encode(),
                headers=headers,
                max_retries=int(message.headers.get("upstash-failure-callback-retries", DEFAULT_RETRIES)),
                delay=0.0,
                created_ms=created_ms,
                not_before_ms=created_ms,
                is_failure_callback=True,
            )
        )

    def attempts(self, *, message_id: str | None = None, url: str | None = None) -> list[DeliveryAttempt]:
        """The delivery log, filtered by message id and/or URL."""
        return [
            a
            for a in list(self.deliveries_log)
            if (message_id is None or a.message_id == message_id) and (url is None or a.url == url)
        ]

    async def start_engine(self) -> None:
        """Create the delivery client on the running (server) loop."""
        if self._http is None:
            self._http = httpx.AsyncClient(trust_env=False)

    async def wait_idle(self, timeout: float) -> None:
        """Wait (on the server loop) until no delivery task is left; TimeoutError if still busy."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._tasks)} QStash message(s) still pending after {timeout}s")
            await asyncio.wait(set(self._tasks), timeout=remaining)

    async def stop_engine(self) -> None:
        """Cancel pending deliveries and close the delivery client."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
