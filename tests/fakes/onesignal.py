"""Loopback fake of OneSignal's create-notification API (``POST /notifications``) and its fixtures.

It answers the way the real service does as far as the push channel can tell: ``Authorization: Key
<key>`` or 403, ``app_id`` and targeting or 400, an ``idempotency_key`` that must be a UUID and that
replays the first result (header ``Idempotent-Replayed: true``, nothing new sent), HTTP 200 with an
empty id for recipients without a subscribed device, and an id plus ``invalid_aliases`` for external
ids OneSignal does not know. Scripted faults (``fail_next``) are answered before any of that.

OneSignal keeps an ``idempotency_key`` for 30 days
(https://documentation.onesignal.com/reference/idempotent-notification-requests). The fake
replays within ``window`` seconds of the request that created the notification, on its ``clock``
(``FakeProvider``); after that the same key creates a new notification.

``requests`` holds every request; ``notifications`` only the notifications actually created.
Error wording is OneSignal's where it is known (``onesignal/errors.py``), the fake's own otherwise.
"""

from __future__ import annotations

import asyncio
import json
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

INVALID_API_KEY = (
    "Access denied.  Please include an 'Authorization: ...' header with a valid API key "
    "(https://documentation.onesignal.com/docs/en/keys-and-ids#api-keys)."
)
NO_TARGETING = "You must include which players, segments, or tags you wish to send this notification to."
NO_SUBSCRIBERS = "All included players are not subscribed"
MISSING_APP_ID = "app_id not found. You may be missing a Content-Type: application/json header."
TARGETING_FIELDS = ("include_aliases", "include_subscription_ids", "included_segments", "filters", "email_to")
IDEMPOTENCY_WINDOW_SECONDS = 30 * 24 * 60 * 60


@dataclass(frozen=True)
class CreatedNotification:
    """A notification the fake created: the id it answered with and the request body."""

    id: str
    body: dict[str, Any]

    @property
    def external_ids(self) -> list[str]:
        return list((self.body.get("include_aliases") or {}).get("external_id", []))


class OneSignalFake(FakeProvider):
    """A OneSignal app with one REST API key; ``url`` is set once it is served."""

    def __init__(
        self,
        *,
        app_id: str,
        api_key: str,
        window: float | None = IDEMPOTENCY_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(window=window, clock=clock)
        self.app_id = app_id
        self.api_key = api_key
        self.url = ""
        self.notifications: list[CreatedNotification] = []
        self.unsubscribed: set[str] = set()
        self.unknown: set[str] = set()
        # Seconds every normal reply is held back after the work is done: a slow or lost reply.
        self.latency = 0.0
        self.in_flight = 0
        self.peak_in_flight = 0
        # idempotency_key -> (when, the JSON reply that created the notification), replayed on a repeat
        self._replies: dict[str, tuple[float, dict[str, Any]]] = {}
        self.app = Starlette(routes=[Route("/notifications", self._create, methods=["POST"])])

    def settings(self) -> dict[str, str]:
        """The service settings that point the push channel at this fake."""
        return {"onesignal_app_id": self.app_id, "onesignal_rest_api_key": self.api_key, "onesignal_api_url": self.url}

    def unsubscribe(self, *external_ids: str) -> None:
        """Mark users as known to OneSignal but without a subscribed device."""
        self.unsubscribed.update(external_ids)

    def forget(self, *external_ids: str) -> None:
        """Mark users as unknown to OneSignal (reported under ``invalid_aliases``)."""
        self.unknown.update(external_ids)

    def sent_to(self, external_id: str) -> list[CreatedNotification]:
        """Return the created notifications that targeted ``external_id``."""
        return [n for n in self.notifications if external_id in n.external_ids]

    async def _create(self, request: Request) -> Response:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            recorded = await self.record(request)
            fault = await self.scripted_fault()
            if fault is not None:
                return fault
            response = self._answer(recorded.headers.get("authorization"), recorded.body)
            if self.latency:
                await asyncio.sleep(self.latency)
            return response
        finally:
            self.in_flight -= 1

    def _answer(self, authorization: str | None, raw: bytes) -> Response:
        if authorization != f"Key {self.api_key}":
            return _errors(403, INVALID_API_KEY)
        try:
            body = json.loads(raw)
        except ValueError:
            return _errors(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or not body.get("app_id"):
            return _errors(400, MISSING_APP_ID)
        if body["app_id"] != self.app_id:
            return _errors(400, f"app_id {body['app_id']!r} is not a valid app id for this key.")
        if not any(body.get(name) for name in TARGETING_FIELDS):
            return _errors(400, NO_TARGETING)
        key = body.get("idempotency_key")
        if key is not None:
            try:
                uuid.UUID(str(key))
            except ValueError:
                return _errors(400, "idempotency_key must be a valid UUID.")
            stored = self._replies.get(key)
            if stored is not None and self.remembers(stored[0]):
                return JSONResponse(stored[1], headers={"Idempotent-Replayed": "true"})
        aliases = list((body.get("include_aliases") or {}).get("external_id", []))
        unknown = [alias for alias in aliases if alias in self.unknown]
        if aliases and not unknown and all(alias in self.unsubscribed for alias in aliases):
            # OneSignal creates nothing here, so a later retry with the same key may still send.
            return JSONResponse({"id": "", "errors": [NO_SUBSCRIBERS]})
        reply: dict[str, Any] = {"id": str(uuid.uuid4())}
        if unknown:
            reply["errors"] = {"invalid_aliases": {"external_id": unknown}}
        self.notifications.append(CreatedNotification(id=reply["id"], body=body))
        if key is not None:
            self._replies[key] = (self.clock(), reply)
        return JSONResponse(reply)


def _errors(status: int, *messages: str) -> JSONResponse:
    return JSONResponse({"errors": list(messages)}, status_code=status)


@pytest.fixture
def onesignal_fake() -> Iterator[OneSignalFake]:
    """A fresh fake OneSignal app served on 127.0.0.1; ``.url``, ``.app_id`` and ``.api_key`` to point a client at."""
    fake = OneSignalFake(app_id=str(uuid.uuid4()), api_key=f"os_v2_app_{uuid.uuid4().hex}")
    with serve(fake.app) as served:
        fake.url = served.url
        yield fake
