"""Per-delivery fault scripts in front of the provider fakes.

``KeyedFaults`` is an ASGI wrapper served in front of a fake's app: it reads each request's
idempotency key and asks a script what the n-th request for that key gets — a scripted ``Fault``
(the fake never sees it), ``Late`` (the fake handles it, then the reply is held back), or ``None``
(the fake answers normally). Scripting per key instead of per request keeps a storm deterministic
however the dispatcher's workers interleave on a slow machine.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.fakes.base import Fault, serve


@dataclass(frozen=True)
class Late:
    """Let the fake handle the request (so the provider acts), then hold its reply back ``seconds``."""

    seconds: float


Script = Callable[[str, int], Fault | Late | None]  # (key, n-th request for that key) -> what it gets
KeyOf = Callable[[Scope, bytes], str | None]


def onesignal_key_of(scope: Scope, body: bytes) -> str | None:
    try:
        key = json.loads(body).get("idempotency_key")
    except (ValueError, AttributeError):
        return None
    return str(key) if key is not None else None


def knock_key_of(scope: Scope, body: bytes) -> str | None:
    if not scope["path"].endswith("/trigger"):
        return None
    return dict(scope["headers"]).get(b"idempotency-key", b"").decode() or None


def ably_key_of(scope: Scope, body: bytes) -> str | None:
    if scope["method"] != "POST" or not scope["path"].endswith("/messages"):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if scope["path"] == "/messages":  # a batch publish: its messages' ids, together, are the request's key
        specs = payload if isinstance(payload, list) else [payload]
        ids = [m.get("id") for spec in specs if isinstance(spec, dict) for m in spec.get("messages") or []]
        return "|".join(sorted(str(i) for i in ids if i)) or None
    first = payload[0] if isinstance(payload, list) and payload else payload
    return str(first.get("id")) if isinstance(first, dict) and first.get("id") else None


class KeyedFaults:
    def __init__(self, app: ASGIApp, key_of: KeyOf, script: Script) -> None:
        self.app = app
        self.key_of = key_of
        self.script = script
        self.seen: Counter[str] = Counter()
        self.faulted: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.overlapping: set[str] = set()  # keys that had two requests in flight at once
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        key = self.key_of(scope, body)
        action: Fault | Late | None = None
        if key is None:
            await self._forward(scope, body, send, None)
            return
        with self._lock:
            self.seen[key] += 1
            action = self.script(key, self.seen[key])
            if isinstance(action, Fault):
                self.faulted[key] += 1
            self.in_flight[key] += 1
            if self.in_flight[key] > 1:
                self.overlapping.add(key)
        try:
            if isinstance(action, Fault):
                await self._answer(action, send)
            else:
                await self._forward(scope, body, send, action)
        finally:
            with self._lock:
                self.in_flight[key] -= 1

    async def _forward(self, scope: Scope, body: bytes, send: Send, action: Late | None) -> None:
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                await asyncio.Event().wait()  # like a client that sent everything and waits
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        if isinstance(action, Late):
            held: list[Message] = []

            async def hold(message: Message) -> None:
                held.append(message)

            await self.app(scope, replay, hold)
            await asyncio.sleep(action.seconds)
            for message in held:
                await send(message)
            return
        await self.app(scope, replay, send)

    @staticmethod
    async def _answer(fault: Fault, send: Send) -> None:
        if fault.hang_seconds:
            await asyncio.sleep(fault.hang_seconds)
        body = fault.body if isinstance(fault.body, bytes) else json.dumps(fault.body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in fault.headers.items()]
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def first(times: int, fault: Fault | Late | Callable[[int], Fault | Late]) -> Script:
    """A script: the first ``times`` requests of every key get ``fault`` (or ``fault(n)``); later ones pass."""

    def script(key: str, n: int) -> Fault | Late | None:
        if n > times:
            return None
        return fault(n) if callable(fault) else fault

    return script


class PerMessage:
    """A script for batch publishes keyed by ``ably_key_of`` (the message ids a request carries): a request is
    refused with ``fault`` while each of its messages has been refused fewer than ``times`` times, and every
    message it carries counts the refusal (``refused``). A batch may carry the announcements of attempts that
    ran at the same moment, so which messages share a request can change from one retry to the next; counted
    per message, no announcement meets the fault more than ``times`` times."""

    def __init__(self, times: int, fault: Fault) -> None:
        self.times = times
        self.fault = fault
        self.refused: Counter[str] = Counter()

    def __call__(self, key: str, n: int) -> Fault | None:
        messages = key.split("|")
        if any(self.refused[m] >= self.times for m in messages):
            return None
        self.refused.update(messages)
        return self.fault


@contextmanager
def in_front_of(
    app: ASGIApp, key_of: KeyOf, script: Script, *, tls: tuple[Path, Path] | None = None
) -> Iterator[tuple[str, KeyedFaults]]:
    """Serve ``KeyedFaults(app, ...)`` on loopback; yield (its URL, the wrapper)."""
    wrapper = KeyedFaults(app, key_of, script)
    with serve(wrapper, tls=tls) as served:
        yield served.url, wrapper


def any_status(statuses: list[int]) -> Callable[[int], Fault]:
    """``fault(n)`` cycling through ``statuses``: the n-th request of a key gets the n-th status."""

    def fault(n: int) -> Fault:
        return Fault.http(statuses[(n - 1) % len(statuses)])

    return fault
