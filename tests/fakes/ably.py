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
* ``GET /channels/{name}/presence`` (the SDK percent-encodes ``:`` here) — the members a test set with
  ``set_present`` / ``set_presence``, paged by ``limit`` with a ``Link: rel="next"`` header like Ably.
* ``POST /keys/{keyName}/requestToken`` — where the SDK goes after a token error (401, 40140-40149)
  even with a key: it switches to token auth. The fake issues a token (the request's ``mac`` is not
  checked) and then also accepts ``Authorization: Bearer base64(token)``.
* Scripted faults from ``FakeProvider``: ``fail_next(ably_error(429, 42910))``, ``Fault.hang(2)``, ...
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.base import FakeProvider, Fault, RecordedRequest, make_self_signed_cert, serve

FAKE_API_KEY = "fakeapp.fakekey:fake-key-secret-0123456789"
DEDUP_WINDOW_SECONDS = 120.0  # Ably's idempotent-publish window
PRESENT, ENTER, LEAVE, UPDATE = 1, 2, 3, 4


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
        self._presence: dict[str, list[dict[str, Any]]] = {}
        self._seen: dict[tuple[str, str], tuple[float, str]] = {}  # (channel, id) -> (when, serial)
        self._serial = 0
        self._tokens: set[str] = set()
        self.app = Starlette(
            routes=[
                Route("/channels/{name:path}/messages", self._publish, methods=["POST"]),
                Route("/channels/{name:path}/presence", self._presence_get, methods=["GET"]),
                Route("/keys/{key_name}/requestToken", self._request_token, methods=["POST"]),
            ]
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
            self._presence.clear()
            self._seen.clear()
            self._tokens.clear()
            self._serial = 0

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

    def _authorized(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme == "Basic":
            return credentials == base64.b64encode(self.api_key.encode()).decode()
        if scheme == "Bearer":
            with self._lock:
                return base64.b64decode(credentials).decode() in self._tokens
        return False

    async def _request_token(self, request: Request) -> Response:
        await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        if request.path_params["key_name"] != self.api_key.split(":")[0]:
            return _error(404, 40400, "no such key")
        now = int(time.time() * 1000)
        with self._lock:
            token = f"fake-token-{len(self._tokens) + 1}"
            self._tokens.add(token)
        body = {"token": token, "issued": now, "expires": now + 3_600_000, "capability": '{"*":["*"]}'}
        return JSONResponse(body, status_code=201)

    async def _publish(self, request: Request) -> Response:
        recorded = await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        if not self._authorized(request):
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
            data = item.get("data")
            if item.get("encoding") == "json" and isinstance(data, str):
                data = json.loads(data)
            message = PublishedMessage(channel, item.get("name"), message_id, data, item.get("encoding"), serial)
            self.published.setdefault(channel, []).append(message)
            if message_id is not None:
                self._seen[(channel, message_id)] = (now, serial)
            return serial

    async def _presence_get(self, request: Request) -> Response:
        await self.record(request)
        if (fault := await self.scripted_fault()) is not None:
            return fault
        if not self._authorized(request):
            return _error(401, 40101, "Invalid credentials")
        channel = request.path_params["name"]
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
        yield fake


@pytest.fixture
def ably_fake(ably_server: AblyFake, monkeypatch: pytest.MonkeyPatch) -> AblyFake:
    """The Ably fake, emptied, with ``SSL_CERT_FILE`` pointing at its certificate for this test."""
    ably_server.reset()
    monkeypatch.setenv("SSL_CERT_FILE", str(ably_server.cert_path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return ably_server
