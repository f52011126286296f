"""Loopback fake of the Knock API (the two endpoints the email channel uses).

Speaks ``POST /v1/workflows/{key}/trigger`` and ``PUT /v1/users/{id}`` with bearer auth, and dedupes
triggers by ``Idempotency-Key`` for 24 hours as Knock documents
(https://docs.knock.app/api-reference/overview/idempotent-requests): a repeat with the same key and
the same body returns the original ``{"workflow_run_id": ...}`` and triggers nothing new; the same
key with a different body is refused. The window runs from the trigger that stored the key, on the
fake's ``clock`` (``window``/``clock``/``advance`` from ``FakeProvider``); after it the same key
starts a new run and is stored afresh. Knock does not document that status; the fake answers 422,
as draft-ietf-httpapi-idempotency-key-header does. The JSON error bodies are invented (Knock's
shape, ``{"code", "message", "status", "type"}``, is not checked against the live API).

``requests`` is every HTTP request received (including scripted faults and replays); ``triggers``
is the workflow runs actually started, once per idempotency key.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.base import FakeProvider, serve

IDEMPOTENCY_WINDOW_SECONDS = 24 * 60 * 60


@dataclass(frozen=True)
class Trigger:
    """One workflow run the fake started."""

    workflow: str
    workflow_run_id: str
    recipients: list[Any]
    data: dict[str, Any]
    idempotency_key: str | None
    body: dict[str, Any]

    @property
    def recipient_ids(self) -> list[str]:
        """The ids of the recipients the run was for (strings, or inline users' ``id``)."""
        return [r if isinstance(r, str) else str(r.get("id")) for r in self.recipients]


def _error(status: int, code: str, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "status": status, "type": type_}, status_code=status)


class KnockFake(FakeProvider):
    """The fake Knock API; serve ``app`` and point ``AsyncKnock(base_url=...)`` at it."""

    def __init__(
        self,
        api_key: str = "sk_test_fake_knock_key",
        *,
        window: float | None = IDEMPOTENCY_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(window=window, clock=clock)
        self.api_key = api_key
        self.url = ""
        self.triggers: list[Trigger] = []
        self.users: dict[str, dict[str, Any]] = {}
        # idempotency key -> (stored at, canonical request body, original response body)
        self._idempotent: dict[str, tuple[float, str, dict[str, Any]]] = {}
        self._state_lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/workflows/{key}/trigger", self._trigger, methods=["POST"]),
                Route("/v1/users/{user_id}", self._update_user, methods=["PUT"]),
            ]
        )

    async def _admit(self, request: Request) -> tuple[Response | None, Any]:
        """Record the request; return a fault/auth/parse error response, or None and the parsed body."""
        recorded = await self.record(request)
        fault = await self.scripted_fault()
        if fault is not None:
            return fault, None
        if recorded.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "api_key_invalid", "The API key provided is invalid.", "authentication_error"), None
        try:
            return None, recorded.json()
        except ValueError:
            return _error(400, "invalid_json", "The request body is not valid JSON."), None

    async def _trigger(self, request: Request) -> Response:
        refusal, body = await self._admit(request)
        if refusal is not None:
            return refusal
        recipients = body.get("recipients") if isinstance(body, dict) else None
        if not isinstance(recipients, list) or not recipients:
            return _error(422, "invalid_params", "recipients: must be a non-empty list")
        key = request.headers.get("idempotency-key")
        canonical = json.dumps(body, sort_keys=True)
        with self._state_lock:
            now = self.clock()
            if key is not None and key in self._idempotent:
                stored_at, stored_body, response = self._idempotent[key]
                if self.remembers(stored_at):
                    if stored_body != canonical:
                        return _error(422, "idempotency_key_mismatch", f"key {key!r} reused with other params")
                    return JSONResponse(response)
            run_id = f"wrun_{uuid.uuid4().hex[:16]}"
            self.triggers.append(
                Trigger(request.path_params["key"], run_id, recipients, body.get("data") or {}, key, body)
            )
            for recipient in recipients:  # inline identification upserts the user, as Knock does
                if isinstance(recipient, dict) and "collection" not in recipient:
                    self.users.setdefault(str(recipient["id"]), {}).update(recipient)
            response = {"workflow_run_id": run_id}
            if key is not None:
                self._idempotent[key] = (now, canonical, response)
        return JSONResponse(response)

    async def _update_user(self, request: Request) -> Response:
        refusal, body = await self._admit(request)
        if refusal is not None:
            return refusal
        user_id = request.path_params["user_id"]
        with self._state_lock:
            user = self.users.setdefault(user_id, {"id": user_id})
            user.update(body if isinstance(body, dict) else {})
            reply = {**user, "__typename": "User", "updated_at": "2026-01-01T00:00:00Z"}
        return JSONResponse(reply)

    def trigger_requests(self) -> list[Any]:
        """The trigger requests received (replays and faulted ones included), oldest first."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/trigger")]


@pytest.fixture
def knock_fake() -> Iterator[KnockFake]:
    """A running fake Knock API on 127.0.0.1; ``.url`` is its base URL, ``.api_key`` the key it accepts."""
    fake = KnockFake()
    with serve(fake.app) as served:
        fake.url = served.url
        yield fake
