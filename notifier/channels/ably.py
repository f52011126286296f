"""Ably REST: announce stored inbox items to open apps, and read presence.

``AblyRealtime`` implements both ``RealtimePublisher`` and ``PresenceChecker`` over the official
``ably`` SDK's async ``AblyRest`` client.

Configuration: ``ABLY_API_KEY`` (``appId.keyId:keySecret``) and, optionally, ``ABLY_REST_URL``, which
replaces Ably's own hosts. ``ABLY_REST_URL`` must be ``https://``: Ably only accepts an API key
(Basic auth) over TLS, so an ``http://`` URL is refused at construction rather than failing every
send. Its host must contain a dot (or be ``localhost``), because the SDK treats a dotless host as a
routing-policy name and appends ``.realtime.ably.net``; it cannot carry a path. With an override the
SDK's fallback hosts are off, so one call makes one request.

Browsers: ``subscribe_token_request`` signs an Ably *token request* locally with the key (the SDK's
``create_token_request``; no network call). A browser posts it to ``token_url`` and gets a token that
can only subscribe to the one channel it names; the key itself never leaves the server.

Event loops: the SDK builds its httpx client in ``AblyRest.__init__``, binding it to the running
loop. ``AblyRealtime`` therefore creates that client lazily, on first use inside the running loop,
and ``aclose()`` must be awaited in the same loop (the app's lifespan does both). Using one instance
from a second loop raises ``RuntimeError``; after ``aclose()`` it may be used again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

import httpx
from ably import AblyRest
from ably.types.message import Message as AblyMessage
from ably.util.exceptions import AblyException

from notifier.channels.base import Announcement, PresenceUnavailable, SendResult
from notifier.channels.edge import describe, finish
from notifier.types import Reason

if TYPE_CHECKING:
    from notifier.config import Settings

# Presence actions (ably/types/presence.py): 1 present, 2 enter, 4 update; 0 absent and 3 leave mean gone.
PRESENT_ACTIONS = frozenset({1, 2, 4})
PRESENCE_PAGE_LIMIT = 1000  # the REST API's maximum
MAX_PRESENCE_PAGES = 10  # beyond 10,000 members we answer with what we have: at worst one extra push
# Ably's REST and realtime endpoint: POST /keys/{keyName}/requestToken and GET /sse are both served there
# (https://ably.com/docs/api/rest-api, https://ably.com/docs/api/sse).
ABLY_BASE_URL = "https://main.realtime.ably.net"
SSE_API_VERSION = "1.2"  # the ``v`` query parameter the SSE endpoint requires
# Batch publish (https://ably.com/docs/api/rest-api#batch-publish) answers per spec with
# ``{successCount, failureCount, results}`` from protocol version 2 on (HTTP 201 even when some channels failed).
BATCH_API_VERSION = "2"


def classify(exc: Exception) -> SendResult:
    """Return the SendResult for an exception raised by a publish: the one edge where SDK errors are mapped.

    The SDK raises ``AblyException`` (``AblyAuthException`` for 401) for provider replies, but lets
    httpx's transport errors through unwrapped.
    """
    if isinstance(exc, AblyException):
        status = exc.status_code if isinstance(exc.status_code, int) else None
        return _by_status(status, f"ably {status}/{exc.code}: {exc.message}")
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return _by_status(status, f"http {status}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return SendResult.retry(f"timed out: {describe(exc)}")
    if isinstance(exc, httpx.ConnectError):
        return SendResult.retry(f"connection failed: {exc}")
    if isinstance(exc, httpx.HTTPError):
        return SendResult.retry(f"transport error: {describe(exc)}")
    return SendResult.retry(f"unexpected {type(exc).__name__}: {exc}")


def _by_status(status: int | None, detail: str) -> SendResult:
    # 429 is Ably's rate limit (42910 etc.): transient. Every other 4xx (bad request, auth, not found) is permanent.
    if status is not None and 400 <= status < 500 and status != 429:
        return SendResult.failed(Reason.rejected, detail, http_status=status)
    return SendResult.retry(detail, http_status=status)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _error_of(items: Any) -> dict[str, Any]:
    """The ``error`` object of an Ably error reply's body (as the SDK's ``request`` lists it), or {}."""
    body = items[0] if isinstance(items, list) and items else items
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _batch_result(announcement: Announcement, spec_result: Any) -> SendResult:
    """Classify one spec's answer (protocol >= 2: ``{successCount, failureCount, results: [...]}``)."""
    results = spec_result.get("results") if isinstance(spec_result, dict) else None
    mine = next((r for r in results or [] if isinstance(r, dict)), None)
    if mine is None:
        return SendResult.retry("ably batch publish: no result for this channel")
    if isinstance(error := mine.get("error"), dict):
        status = _int(error.get("statusCode"))
        return _by_status(status, f"ably {status}/{error.get('code')}: {error.get('message', '')}")
    serials = [str(serial) for serial in mine.get("serials") or [] if serial]
    return SendResult.sent(announcement.message_id, detail=f"serial {serials[0]}" if serials else "")


def client_options(*, rest_url: str | None, timeout: float) -> dict[str, Any]:
    """Return the ``AblyRest`` keyword options for ``rest_url`` (None: Ably's own hosts) and ``timeout``.

    Raises ``ValueError`` naming ABLY_REST_URL when the URL cannot be used with an API key.
    """
    # JSON, not msgpack; every wait bounded by our timeout so QStash's retries stay the only long loop.
    options: dict[str, Any] = {
        "use_binary_protocol": False,
        "http_open_timeout": timeout,
        "http_request_timeout": timeout,
        "http_max_retry_duration": timeout,
    }
    if rest_url is None:
        return options
    parts = urlsplit(rest_url)
    if parts.scheme != "https":
        raise ValueError(
            f"ABLY_REST_URL must be https:// (Ably refuses API-key auth over plain HTTP), got scheme {parts.scheme!r}"
        )
    host = parts.hostname or ""
    if "." not in host and host != "localhost":
        raise ValueError(f"ABLY_REST_URL host {host!r} must contain a dot or be localhost (the SDK rewrites others)")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"ABLY_REST_URL cannot have a path or query, got {rest_url!r}")
    options.update(endpoint=host, tls=True, tls_port=parts.port or 443, fallback_hosts=[])
    return options


class AblyRealtime:
    """Publishes to and reads presence from Ably over REST; bound to one event loop once used."""

    provider: ClassVar[str] = "ably"
    # Ably drops a message whose id it saw on the channel in the last 2 minutes
    # (https://ably.com/docs/pub-sub/advanced#idempotency).
    dedupe_window: ClassVar[dt.timedelta | None] = dt.timedelta(minutes=2)

    def __init__(self, *, api_key: str, rest_url: str | None, timeout: float) -> None:
        """Check the configuration; no client is built (and no loop bound) until the first call.

        Raises ``ValueError`` for a malformed key or an unusable ``rest_url``.
        """
        # The SDK's own error for a malformed key echoes the key, secret included; refuse it here instead.
        if api_key.count(":") != 1 or not all(api_key.split(":")):
            raise ValueError("ABLY_API_KEY must look like 'appId.keyId:keySecret'")
        self._api_key = api_key
        self._options = client_options(rest_url=rest_url, timeout=timeout)
        self.base_url = f"https://{urlsplit(rest_url).netloc}" if rest_url else ABLY_BASE_URL
        self._rest: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AblyRealtime | None:
        """Return a client for ``settings``, or None when ABLY_API_KEY is not set."""
        if settings.ably_api_key is None:
            return None
        return cls(
            api_key=settings.ably_api_key.get_secret_value(),
            rest_url=settings.ably_rest_url,
            timeout=settings.provider_timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"AblyRealtime(endpoint={self._options.get('endpoint', 'ably')!r})"

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._rest is None:
            self._rest = AblyRest(key=self._api_key, **self._options)
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AblyRealtime is bound to the event loop it was first used in; build one per loop")
        return self._rest

    async def publish(self, *, channel_name: str, name: str, message_id: str, data: Mapping[str, Any]) -> SendResult:
        """Publish ``data`` as message ``name`` with id ``message_id`` on ``channel_name`` and classify the outcome.

        Ably drops a second message with the same id on a channel within 2 minutes, so a retry with the
        same ``message_id`` is announced once. Returns ``sent(message_id)``; never raises for provider faults.
        """
        client = self._client()
        message = AblyMessage(name=name, id=message_id, data=dict(data))
        try:
            result = await client.channels.get(channel_name).publish(message)
        except Exception as exc:
            return finish(classify(exc), self._secrets)
        serials = [str(serial) for serial in getattr(result, "serials", None) or [] if serial]
        return SendResult.sent(message_id, detail=f"serial {serials[0]}" if serials else "")

    async def publish_many(self, announcements: Sequence[Announcement]) -> list[SendResult]:
        """Publish each announcement on its own channel with ONE batch request (REST ``POST /messages``, one
        spec per channel); one classified result per announcement, in order. Never raises for provider faults.

        Each message keeps its id, so Ably's per-channel dedupe makes a retried batch announce each once.
        A refused request classifies every announcement alike; a per-channel error only its own.
        """
        if not announcements:
            return []
        client = self._client()
        specs = [
            {
                "channels": [a.channel_name],
                "messages": [AblyMessage(name=a.name, id=a.message_id, data=dict(a.data)).as_dict(binary=False)],
            }
            for a in announcements
        ]
        try:
            response = await client.request("POST", "/messages", BATCH_API_VERSION, body=specs)
        except Exception as exc:
            return [finish(classify(exc), self._secrets)] * len(announcements)
        if not response.success:
            error = _error_of(response.items)
            status = _int(error.get("statusCode")) or response.status_code
            detail = f"ably {status}/{error.get('code', response.error_code)}: {error.get('message', '')}"
            return [finish(_by_status(status, detail), self._secrets)] * len(announcements)
        outcomes = response.items
        return [
            finish(_batch_result(a, outcomes[i] if i < len(outcomes) else None), self._secrets)
            for i, a in enumerate(announcements)
        ]

    async def present_members(self, channel_name: str) -> frozenset[str]:
        """Return the client ids present (present, enter, update) on ``channel_name``.

        Raises ``PresenceUnavailable`` (from the SDK's or httpx's exception) when Ably cannot answer.
        """
        client = self._client()
        members: set[str] = set()
        try:
            page = await client.channels.get(channel_name).presence.get(limit=PRESENCE_PAGE_LIMIT)
            for _ in range(MAX_PRESENCE_PAGES):
                members.update(str(m.client_id) for m in page.items if m.action in PRESENT_ACTIONS and m.client_id)
                if not page.has_next():
                    break
                page = await page.next()
        except Exception as exc:
            detail = finish(classify(exc), self._secrets).detail
            raise PresenceUnavailable(f"presence on {channel_name!r} unavailable: {detail}") from exc
        return frozenset(members)

    @property
    def token_url(self) -> str:
        """Where a signed token request is exchanged for a token (Ably's own host, or ``ABLY_REST_URL``'s)."""
        return f"{self.base_url}/keys/{quote(self._api_key.split(':', 1)[0], safe='')}/requestToken"

    def sse_url(self, channel_name: str) -> str:
        """The Server-Sent Events URL that streams ``channel_name``, without its ``accessToken`` parameter."""
        return f"{self.base_url}/sse?v={SSE_API_VERSION}&channels={quote(channel_name, safe='')}"

    async def subscribe_token_request(self, *, channel_name: str, client_id: str, ttl: dt.timedelta) -> dict[str, Any]:
        """Return a signed Ably token request for a token that may only subscribe to ``channel_name``.

        The token carries ``client_id`` and lives ``ttl``; the request itself is accepted by Ably for a
        few minutes after it is made. Signed here with the key's secret and the local clock: no network
        call. The result is the JSON body ``token_url`` takes (``keyName``, ``ttl``, ``capability``,
        ``clientId``, ``timestamp``, ``nonce``, ``mac``).
        """
        token_params = {
            "capability": {channel_name: ["subscribe"]},
            "client_id": client_id,
            "ttl": int(ttl.total_seconds() * 1000),
        }
        request = await self._client().auth.create_token_request(token_params, query_time=False)
        body: dict[str, Any] = request.to_dict()
        return body

    @property
    def _secrets(self) -> tuple[str, str]:
        """What a provider that echoes the key must not put in a delivery record: the key, and its secret part."""
        return self._api_key, self._api_key.split(":", 1)[1]

    async def aclose(self) -> None:
        """Close the SDK's HTTP client, in the loop that created it; safe to call twice or before any use."""
        rest, self._rest, self._loop = self._rest, None, None
        if rest is not None:
            await rest.close()
