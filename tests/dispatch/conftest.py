"""Shared by the QStash dispatcher tests: a recording stand-in for our ``/v1/qstash/*`` endpoints."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from notifier.dispatch.base import DispatchItem
from notifier.dispatch.qstash import QStashDispatcher
from tests.fakes.base import Fault, RecordedRequest, serve
from tests.fakes.qstash import QStashEmulator

MAX_RETRIES = 2
MakeDispatcher = Callable[..., QStashDispatcher]


class Destination:
    """Our service as QStash sees it: records every call; answers 200 unless a fault is scripted.

    Faults are scripted per kind -- the path segment after ``/v1/qstash/`` (``deliveries``,
    ``failures``, ``cron``) -- so a failing delivery does not also fail its failure callback.
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])

    def fail(self, kind: str, *faults: Fault) -> None:
        self.faults[kind].extend(faults)

    def received(self, kind: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith(f"/v1/qstash/{kind}")]

    async def _handle(self, request: Request) -> Response:
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.body(),
        )
        self.requests.append(recorded)
        kind = recorded.path.split("/")[3] if recorded.path.count("/") >= 3 else ""
        if self.faults[kind]:
            fault = self.faults[kind].popleft()
            return JSONResponse(fault.body, status_code=fault.status, headers=fault.headers)
        return JSONResponse({"ok": True})


@pytest.fixture
def destination() -> Iterator[Destination]:
    dest = Destination()
    with serve(dest.app) as served:
        dest.url = served.url
        yield dest


@pytest.fixture
async def make_dispatcher(qstash_emulator: QStashEmulator, destination: Destination) -> AsyncIterator[MakeDispatcher]:
    created: list[QStashDispatcher] = []

    def make(**overrides: Any) -> QStashDispatcher:
        options: dict[str, Any] = {
            "token": qstash_emulator.token,
            "base_url": qstash_emulator.url,
            "public_url": destination.url,
            "max_retries": MAX_RETRIES,
            "timeout": 2.0,
        }
        dispatcher = QStashDispatcher(**(options | overrides))
        created.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in created:
        await dispatcher.aclose()


@contextlib.contextmanager
def hung_server() -> Iterator[str]:
    """A loopback port that accepts connections (kernel backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def api_calls(emulator: QStashEmulator, prefix: str) -> list[RecordedRequest]:
    return [r for r in emulator.requests if r.path.startswith(prefix)]


def delivery_url(destination: Destination, item: DispatchItem) -> str:
    return f"{destination.url}/v1/qstash/deliveries/{item.delivery_id}"


def b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))
