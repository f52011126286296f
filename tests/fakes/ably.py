"""Loopback fake of Ably's REST API (publish and presence), served over TLS.

The Ably SDK refuses an API key over plain HTTP, so the fake runs under uvicorn with a throwaway
self-signed certificate. The ``ably_fake`` fixture makes clients trust it by setting
``SSL_CERT_FILE`` (httpx reads it when a client is *created*, so create the Ably client after the
fixture ran — ``AblyRealtime`` creates it lazily on first use).

What it speaks:

* ``POST /channels/{name}/messages`` — ``Authorization: Basic base64(key)`` or a 401/40101 Ably error;
  a JSON body of one message or an array; messages are deduplicated by ``id`` per channel for two
  minutes, as Ably does (``window`` seconds from the publish that was accepted, on the fake's
  ``clock``; after that the same id is published again). ``published`` holds the unique messages
  per channel (data decoded when ``encoding`` is ``json``); ``requests`` holds every request.
  Replies 201 ``{"serials": [...]}``.
* ``POST /messages`` — batch publish: one spec or a list of ``{"channels", "messages"}``, each message
  deduplicated per channel as above; 201 with ``{successCount, failureCount, results}`` per spec (protocol
  2), a channel named in ``refused`` answering ``{"channel", "error"}`` instead.
* ``GET /channels/{name}/presence`` (the SDK percent-encodes ``:`` here) — the members a test set with
  ``set_present`` / ``set_presence``, paged by ``limit`` with a ``Link: rel="next"`` header like Ably.
* ``POST /keys/{keyName}/requestToken`` — a token request, signed (``mac``) or, with Basic auth,
  unsigned. Checked as Ably does (https://ably.com/docs/api/token-request-spec): the key name, the
  ``mac`` (HMAC-SHA256 with the key secret over keyName, ttl, capability, clientId, timestamp and nonce,
  one per line), a timestamp within 2 minutes of now (40104), a nonce not seen before (40105), a ttl of
  at most a day, a capability that is a JSON object of operation lists. The token it issues carries that
  capability, client id and expiry (``tokens``); ``Authorization: Bearer base64(token)`` then works for
  what the capability allows. The SDK comes here after a token error (401, 40140-40149) even with a key.
* ``GET /sse?v=1.2&channels=a,b&accessToken=T`` (or ``key=``) — Ably's Server-Sent Events endpoint
  (https://ably.com/docs/api/sse): refused before streaming with an Ably error body for an unknown
  token (401/40101), an expired one (401/40142) or a capability without ``subscribe`` on a channel
  (401/40160); else ``text/event-stream`` of every message published on those channels afterwards, as
  ``id: <serial>`` / ``event: message`` / ``data: <Message JSON>`` (``data`` as published, with its
  ``encoding``). ``lastEvent=<serial>`` replays what followed it. When the token expires (or
  ``expire_tokens()`` is called) the stream sends ``event: error`` with 40142 and ends, as Ably does.
* CORS on every route (``Access-Control-Allow-Origin: *``, preflights answered), since pages on another
  origin exchange token requests and open the stream.
* Scripted faults from ``FakeProvider``: ``fail_next(ably_error(429, 42910))``, ``Fault.hang(2)``, ...
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.base import FakeProvider, Fault, RecordedRequest, make_self_signed_cert, serve

FAKE_API_KEY = "fakeapp.fakekey:fake-key-secret-0123456789"
DEDUP_WINDOW_SECONDS = 120.0  # Ably's idempotent-publish window
PRESENT, ENTER, LEAVE, UPDATE = 1, 2, 3, 4
TOKEN_REQUEST_MAX_AGE_MS = 120_000  # a token request's timestamp must be within 2 minutes of the server's time
DEFAULT_TOKEN_TTL_MS = 3_600_000
MAX_TOKEN_TTL_MS = 86_400_000
KEY_CAPABILITY = {"*": ["*"]}


def ably_error(status: int, code: int, message: str | None = None) -> Fault:
    """A Fault shaped like an Ably error reply (JSON body and ``X-Ably-ErrorCode`` header)."""
    text = message or f"scripted error {code}"
    body = {"error": {"code": code, "statusCode": status, "message": text}}
    return Fault(status=status, body=body, headers={"X-Ably-ErrorCode": str(code), "X-Ably-ErrorMessage": text})


def _error(status: int, code: int, message: str) -> JSONResponse:
    fault = ably_error(status, code, message)
    return JSONResponse(fault.body, status_code=status, headers=fault.headers)


@dataclass
class AblyRequest(RecordedRequest):
    raw_path: str = ""  # as sent, before uvicorn percent-decodes it into ``path``


@dataclass(frozen=True)
class PublishedMessage:
    channel: str
    name: str | None
    id: str | None
    data: Any  # decoded from JSON when the message says ``encoding: json``
    encoding: str | None
    serial: str
    raw_data: Any = None  # ``data`` as published (a JSON string when ``encoding`` is ``json``)
    timestamp: int = 0


@dataclass(frozen=True)
class IssuedToken:
    token: str
    capability: dict[str, list[str]]
    client_id: str | None
    expires: int  # ms since the epoch

    def allows(self, operation: str, channel: str) -> bool:
        """Whether the capability grants ``operation`` on ``channel`` (``*`` resources and operations, ``ns:*``)."""
        for resource, operations in self.capability.items():
            matches = resource in ("*", channel) or (resource.endswith("*") and channel.startswith(resource[:-1]))
            if matches and ("*" in operations or operation in operations):
                return True
        return False


@dataclass
class SseConnection:
    """One open (or closed) SSE stream, for tests to look at."""

    channels: tuple[str, ...]
    token: IssuedToken | None
    queue: asyncio.Queue[PublishedMessage | str | None]
    loop: asyncio.AbstractEventLoop
    closed: bool = False
    sent: list[str] = field(default_factory=list)  # serials streamed


def ably_mac(key_secret: str, request: dict[str, Any]) -> str:
    """The MAC of a token request: HMAC-SHA256 (base64) over its canonical fields, one per line."""
    fields = ("keyName", "ttl", "capability", "clientId", "timestamp", "nonce")
    text = "".join(f"{'' if request.get(name) is None else request[name]}\n" for name in fields)
    return base64.b64encode(hmac.new(key_secret.encode(), text.encode(), hashlib.sha256).digest()).decode()


class AblyFake(FakeProvider):
    def __init__(
        self,
        *,
        api_key: str = FAKE_API_KEY,
        cert_path: Path | None = None,
        window: float | None = DEDUP_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(window=window, clock=clock)
        self.api_key = api_key
        self.cert_path = cert_path
        self.url = ""  # https://127.0.0.1:PORT once served
        self.published: dict[str, list[PublishedMessage]] = {}
        self.refused: dict[str, tuple[int, int]] = {}  # channel -> (status, code) a batch publish answers for it
        self._presence: dict[str, list[dict[str, Any]]] = {}
        self._seen: dict[tuple[str, str], tuple[float, str]] = {}  # (channel, id) -> (when, serial)
        self._serial = 0
        self.tokens: dict[str, IssuedToken] = {}
        self._nonces: set[tuple[int, str]] = set()
        self.streams: list[SseConnection] = []
        self.app = Starlette(
            routes=[
                Route("/channels/{name:path}/messages", self._publish, methods=["POST"]),
                Route("/messages", self._batch_publish, methods=["POST"]),
                Route("/channels/{name:path}/presence", self._presence_get, methods=["GET"]),
                Route("/keys/{key_name}/requestToken", self._request_token, methods=["POST"]),
                Route("/sse", self._sse, methods=["GET"]),
            ],
            # Browsers on other origins exchange token requests and open streams; Ably answers them with CORS.
            middleware=[
                Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"])
            ],
        )

    def reset(self) -> None:
        """Forget requests, faults, published messages and presence, and restore Ably's window on wall time.

        The server is shared by the tests of a session.
        """
        self.clear_faults()
        self.window, self.clock = DEDUP_WINDOW_SECONDS, time.time
        with self._lock:
            self.requests.clear()
            self.published.clear()
            self.refused.clear()
            self._presence.clear()
            self._seen.clear()
            self.tokens.clear()
            self._nonces.clear()
            self._serial = 0
        self.close_streams()

    def set_present(self, channel: str, client_ids: list[str]) -> None:
        """Make ``client_ids`` the members present on ``channel`` (one connection each)."""
        now = int(time.time() * 1000)
        self.set_presence(
            channel,
            [
                {"id": f"conn{i}:0:0", "clientId": cid, "connectionId": f"conn{i}", "timestamp": now, "action": PRESENT}
                for i, cid in enumerate(client_ids)
            ],
        )

    def set_presence(self, channel: str, messages: list[dict[str, Any]]) -> None:
        """Answer presence on ``channel`` with these raw presence messages."""
        with self._lock:
            self._presence[channel] = list(messages)

    @property
    def raw_paths(self) -> list[str]:
        """Each request's path as sent (``requests[i].path`` is percent-decoded)."""
        with self._lock:
            return [getattr(r, "raw_path", r.path) for r in self.requests]

    def messages(self, channel: str) -> list[PublishedMessage]:
        """The unique messages published on ``channel``, in order."""
        with self._lock:
            return list(self.published.get(channel, []))

    async def record(self, request: Request) -> AblyRequest:
        recorded = AblyRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.body(),
            query=request.url.query,
            raw_path=request.scope.get("raw_path", b"").decode("latin-1"),
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    def _authorized(self, request: Request, operation: str, channel: str) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme == "Basic":
            return self._is_key(credentials)
        if scheme == "Bearer":
            try:
                token = self._live_token(base64.b64decode(credentials).decode())
            except ValueError:
                return False
            return token is not None and token.allows(operation, channel)
        return False

    def _is_key(self, basic_credentials: str) -> bool:
        return hmac.compare_digest(basic_credentials, base64.b64encode(self.api_key.encode()).decode())

    def _live_token(self, value: str) -> IssuedToken | None:
        with self._lock:
            token = self.tokens.get(value)
        return token if token is not None and token.expires > time.time() * 1000 else None

    async def _request_token(self, request: Request) -> Response:
        recorded = await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        key_name, key_secret = self.api_key.split(":")
        if request.path_params["key_name"] != key_name:
            return _error(404, 40400, "no such key")
        try:
            body = recorded.json()
        except ValueError:
            return _error(400, 40001, "invalid request body: not JSON")
        if not isinstance(body, dict) or body.get("keyName") != key_name:
            return _error(400, 40001, "invalid request body: keyName missing or not this key")
        now = int(time.time() * 1000)
        if "mac" in body:
            if not hmac.compare_digest(str(body["mac"]), ably_mac(key_secret, body)):
                return _error(401, 40101, "Invalid credentials: mac does not match")
        elif not self._is_key(request.headers.get("authorization", "").partition(" ")[2]):
            return _error(401, 40101, "Invalid credentials: an unsigned token request needs Basic auth")
        timestamp, nonce = body.get("timestamp"), body.get("nonce")
        if not isinstance(timestamp, int) or abs(now - timestamp) > TOKEN_REQUEST_MAX_AGE_MS:
            return _error(401, 40104, "Timestamp not current")
        if not isinstance(nonce, str) or len(nonce) < 16:
            return _error(400, 40003, "nonce must be a string of at least 16 characters")
        ttl = body.get("ttl") or DEFAULT_TOKEN_TTL_MS
        if not isinstance(ttl, int) or not 0 < ttl <= MAX_TOKEN_TTL_MS:
            return _error(400, 40003, f"invalid ttl {ttl!r}")
        try:
            capability = json.loads(body["capability"]) if body.get("capability") else KEY_CAPABILITY
        except (TypeError, ValueError):
            return _error(400, 40003, "capability is not JSON")
        if (
            not isinstance(capability, dict)
            or not capability
            or not all(
                isinstance(ops, list) and ops and all(isinstance(op, str) for op in ops) for ops in capability.values()
            )
        ):
            return _error(401, 40160, "Key does not support requested capabilities")
        with self._lock:
            if (timestamp, nonce) in self._nonces:
                return _error(401, 40105, "Nonce value replayed")
            self._nonces.add((timestamp, nonce))
            token = IssuedToken(f"fake-token-{len(self.tokens) + 1}", capability, body.get("clientId"), now + ttl)
            self.tokens[token.token] = token
        issued = {
            "token": token.token,
            "keyName": key_name,
            "issued": now,
            "expires": token.expires,
            "capability": json.dumps(capability, separators=(",", ":"), sort_keys=True),
        }
        if token.client_id is not None:
            issued["clientId"] = token.client_id
        return JSONResponse(issued, status_code=201)

    async def _sse(self, request: Request) -> Response:
        await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        params = request.query_params
        channels = tuple(c for c in (params.get("channels") or params.get("channel") or "").split(",") if c)
        if params.get("v") is None or not channels:
            return _error(400, 40000, "v and channels are required")
        token: IssuedToken | None = None
        if "accessToken" in params:
            with self._lock:
                token = self.tokens.get(params["accessToken"])
            if token is None:
                return _error(401, 40101, "Invalid credentials: unknown token")
            if token.expires <= time.time() * 1000:
                return _error(401, 40142, "Token expired")
            denied = [channel for channel in channels if not token.allows("subscribe", channel)]
            if denied:
                return _error(401, 40160, f"Channel denied access based on given capability; channel = {denied[0]}")
        elif params.get("key") != self.api_key:
            return _error(401, 40101, "Invalid credentials")
        stream = SseConnection(channels, token, asyncio.Queue(), asyncio.get_running_loop())
        last = params.get("lastEvent")
        with self._lock:
            self.streams.append(stream)
            if last:
                for channel in channels:
                    serials = [m.serial for m in self.published.get(channel, [])]
                    if last in serials:
                        for message in self.published[channel][serials.index(last) + 1 :]:
                            stream.queue.put_nowait(message)
        return StreamingResponse(
            self._stream(stream), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _stream(self, stream: SseConnection) -> AsyncIterator[str]:
        try:
            yield ":keepalive\n\n"
            while True:
                timeout = None
                if stream.token is not None:
                    timeout = max(0.0, stream.token.expires / 1000 - time.time())
                try:
                    item = await asyncio.wait_for(stream.queue.get(), timeout)
                except TimeoutError:
                    item = "expired"
                if item is None:
                    return
                if item == "expired":
                    error = {"message": "Token expired", "code": 40142, "statusCode": 401}
                    yield f"event: error\ndata: {json.dumps(error)}\n\n"
                    return
                if isinstance(item, PublishedMessage):
                    message = {"id": item.id, "name": item.name, "timestamp": item.timestamp, "channel": item.channel,
                               "data": item.raw_data}  # fmt: skip
                    if item.encoding:
                        message["encoding"] = item.encoding
                    stream.sent.append(item.serial)
                    yield f"id: {item.serial}\nevent: message\ndata: {json.dumps(message)}\n\n"
        finally:
            stream.closed = True

    def open_streams(self, channel: str | None = None) -> list[SseConnection]:
        """The SSE streams still open (on ``channel``, when given)."""
        with self._lock:
            return [s for s in self.streams if not s.closed and (channel is None or channel in s.channels)]

    def expire_tokens(self) -> None:
        """Expire every issued token now: open streams get Ably's 40142 error event and end, as at a token's expiry."""
        with self._lock:
            self.tokens = {
                value: IssuedToken(t.token, t.capability, t.client_id, 0) for value, t in self.tokens.items()
            }
            streams = [s for s in self.streams if not s.closed]
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, "expired")

    def close_streams(self) -> None:
        """End every open stream (so a server can stop without waiting for browsers to hang up)."""
        with self._lock:
            streams, self.streams = [s for s in self.streams if not s.closed], []
        for stream in streams:
            if not stream.loop.is_closed():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, None)

    async def _publish(self, request: Request) -> Response:
        recorded = await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        if not self._authorized(request, "publish", request.path_params["name"]):
            return _error(401, 40101, "Invalid credentials")
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _error(400, 40000, "this fake only speaks JSON")
        try:
            body = recorded.json()
        except ValueError:
            return _error(400, 40000, "body is not JSON")
        items = body if isinstance(body, list) else [body]
        channel = request.path_params["name"]
        serials = [self._accept(channel, item) for item in items]
        return JSONResponse({"serials": serials}, status_code=201)

    async def _batch_publish(self, request: Request) -> Response:
        """Ably's batch publish (protocol >= 2): one spec or a list of ``{"channels", "messages"}``; answers 201
        with ``{successCount, failureCount, results}`` per spec, a channel in ``refused`` (or one the
        credentials may not publish on) answering its own error inside the results."""
        recorded = await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        try:
            body = recorded.json()
        except ValueError:
            return _error(400, 40000, "body is not JSON")
        answers = []
        for spec in body if isinstance(body, list) else [body]:
            channels, items = spec.get("channels"), spec.get("messages")
            channels = channels if isinstance(channels, list) else [channels]
            items = items if isinstance(items, list) else [items]
            results: list[dict[str, Any]] = []
            for channel in channels:
                refused = self.refused.get(channel)
                if refused is None and not self._authorized(request, "publish", channel):
                    refused = (401, 40160)
                if refused is not None:
                    error = {"statusCode": refused[0], "code": refused[1], "message": f"refused {refused[1]}"}
                    results.append({"channel": channel, "error": error})
                else:
                    serials = [self._accept(channel, item) for item in items]
                    results.append({"channel": channel, "messageId": f"m-{channel}", "serials": serials})
            failures = sum("error" in r for r in results)
            answers.append({"successCount": len(results) - failures, "failureCount": failures, "results": results})
        return JSONResponse(answers if isinstance(body, list) else answers[0], status_code=201)

    def _accept(self, channel: str, item: dict[str, Any]) -> str:
        now = self.clock()
        message_id = item.get("id")
        with self._lock:
            if message_id is not None:
                seen = self._seen.get((channel, message_id))
                if seen is not None and self.remembers(seen[0]):
                    return seen[1]  # a duplicate: accepted, not published again (fake answers the first serial)
            self._serial += 1
            serial = f"fake-{self._serial:06d}@{channel}"
            raw = data = item.get("data")
            if item.get("encoding") == "json" and isinstance(data, str):
                data = json.loads(data)
            message = PublishedMessage(
                channel, item.get("name"), message_id, data, item.get("encoding"), serial, raw, int(time.time() * 1000)
            )
            self.published.setdefault(channel, []).append(message)
            if message_id is not None:
                self._seen[(channel, message_id)] = (now, serial)
            streams = [s for s in self.streams if not s.closed and channel in s.channels]
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, message)
        return serial

    async def _presence_get(self, request: Request) -> Response:
        await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        channel = request.path_params["name"]
        if not self._authorized(request, "subscribe", channel):
            return _error(401, 40101, "Invalid credentials")
        limit = min(int(request.query_params.get("limit", "100")), 1000)
        start = int(request.query_params.get("cursor", "0"))
        with self._lock:
            members = self._presence.get(channel, [])
        headers = {}
        if start + limit < len(members):
            headers["Link"] = f'<./presence?limit={limit}&cursor={start + limit}>; rel="next"'
        return JSONResponse(members[start : start + limit], headers=headers)


@pytest.fixture(scope="session")
def ably_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AblyFake]:
    """One TLS fake for the session; use ``ably_fake``, which resets it and trusts its certificate."""
    cert, key = make_self_signed_cert(tmp_path_factory.mktemp("ably-tls"))
    fake = AblyFake(cert_path=cert)
    with serve(fake.app, tls=(cert, key)) as served:
        fake.url = served.url
        try:
            yield fake
        finally:
            fake.close_streams()  # uvicorn waits for open responses before it stops


@pytest.fixture
def ably_fake(ably_server: AblyFake, monkeypatch: pytest.MonkeyPatch) -> AblyFake:
    """The Ably fake, emptied, with ``SSL_CERT_FILE`` pointing at its certificate for this test."""
    ably_server.reset()
    monkeypatch.setenv("SSL_CERT_FILE", str(ably_server.cert_path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return ably_server
