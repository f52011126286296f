"""The raw baseline: the least code that does notifier's durable work, as a uvicorn factory.

``POST /v1/events`` (bearer key): for a type with a presence channel (chat), ask Ably who is present
(``GET /channels/{name}/presence``, as notifier does; a failed lookup means nobody), then resolve the
recipients and read their preference documents in one query (the named recipients, plus the users
of the audience's organization holding any of its roles: the event's ``audience``, else its
``organization_id`` with the type's default ``audience_roles``, as notifier resolves them; else the
type's ``recipient_field``), plan each recipient x default channel (opt-out ->
suppressed, present -> suppressed ``recipient_online`` for the presence-suppressed channels, quiet
hours -> deferred, else queued), and INSERT the event, its deliveries and their first transitions
into notifier's own schema in one transaction (dedupe on the idempotency key), then answer 202
with the deliveries as notifier does.

A bare sender loop (started by the lifespan) claims queued rows in batches (``FOR UPDATE SKIP
LOCKED``) and, in that transaction, opens an attempt row and records the queued -> sending
transition per row; it makes one provider HTTP call per delivery, the call notifier's channels
make (OneSignal, Knock, Ably), with one pooled ``httpx.AsyncClient`` and ``concurrency`` calls in
flight; then, in one transaction per flush, it marks the rows sent (or failed), finishes their
attempts, records the sending -> sent/failed transitions and writes the inbox row for in-app (like
notifier's inbox channel). Every write is one statement per batch.

No ORM, no template engine (title and body are the type and the data), no validation, no metrics,
no logs, no retries or backoff (a failed call is final): that is the point of a baseline.
Configuration comes from ``RAW_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote_plus

import asyncpg
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from notifier.catalog import load_catalog

NAMESPACE = uuid.UUID("6f1c1f38-4a7e-5d9c-9a43-2d1f2f4b7a10")  # notifier's idempotency-key namespace
INTERRUPTIBLE = {"push", "email"}
DELIVERY_COLUMNS = (
    "id, event_id, event_type, user_id, channel, provider, status, reason, not_before, attempts, retry_base, "
    "created_at, updated_at"
)
PROVIDERS = {"push": "onesignal", "email": "knock", "in_app": "inbox"}
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")  # catalog strings such as "chat:{{ conversation_id }}"
PRESENT_ACTIONS = {1, 2, 4}  # Ably presence actions present, enter, update (absent 0 and leave 3 mean gone)
# The named recipients and the audience (users of an organization with any of the roles; all of them for
# no roles), each with their preference document. Uses users' organization index; $2 NULL: no audience.
RECIPIENTS = (
    "SELECT u.id, p.document FROM users u LEFT JOIN preferences p ON p.user_id = u.id WHERE u.id = ANY($1::text[])"
    " OR (u.organization_id = $2 AND (cardinality($3::text[]) = 0 OR u.roles ?| $3::text[])) ORDER BY u.id"
)


def audience_of(event_type: Any, body: Mapping[str, Any], named: list[str]) -> tuple[str | None, list[str]]:
    """(organization id, roles) whose users the event goes to besides ``named``: notifier's rules; (None, []): none.

    An explicit ``audience`` wins; else, with no named recipients, the event's ``organization_id`` and the
    type's default ``audience_roles``.
    """
    audience = body.get("audience")
    if audience is not None:
        return str(audience["organization_id"]), list(audience.get("roles") or [])
    if not named and event_type.audience_roles and body.get("organization_id"):
        return str(body["organization_id"]), list(event_type.audience_roles)
    return None, []


def _in_quiet_hours(window: dict[str, Any], now: dt.datetime) -> bool:
    # The bench's windows are in UTC; a window may cross midnight.
    t, start, end = now.strftime("%H:%M"), window["start"], window["end"]
    return start <= t < end if start < end else (t >= start or t < end)


def plan(
    event_type: Any, user_id: str, document: dict[str, Any], now: dt.datetime, present: bool = False
) -> list[tuple[str, str, Any]]:
    """(channel, status, reason) per channel that gets a row: notifier's rules for user-level documents.

    An explicit user value (global switch off, then event type, then category) decides, else the
    catalog default; a channel off by default and not mentioned gets no row; critical types send; a
    ``present`` recipient gets no ``presence_suppresses`` channel.
    """
    out = []
    for channel in sorted(event_type.allowed_channels):
        default = channel in event_type.default_channels
        explicit = None
        if not (event_type.critical and default):
            for value in (
                False if document.get("channels", {}).get(channel) is False else None,
                document.get("event_types", {}).get(event_type.name, {}).get(channel),
                document.get("categories", {}).get(event_type.category, {}).get(channel),
            ):
                if value is not None:
                    explicit = value
                    break
        enabled = default if explicit is None else explicit
        if not enabled and explicit is None:
            continue
        if not enabled:
            out.append((str(channel), "suppressed", "opted_out"))
        elif present and channel in event_type.presence_suppresses:
            out.append((str(channel), "suppressed", "recipient_online"))
        elif not event_type.critical and channel in INTERRUPTIBLE and document.get("quiet_hours"):
            quiet = _in_quiet_hours(document["quiet_hours"], now)
            out.append((str(channel), "deferred" if quiet else "queued", None))
        else:
            out.append((str(channel), "queued", None))
    return out


class Raw:
    def __init__(self) -> None:
        self.dsn = os.environ["RAW_DATABASE_URL"]
        self.key = os.environ["RAW_API_KEY"].encode()
        self.concurrency = int(os.environ.get("RAW_CONCURRENCY", "16"))
        self.onesignal = os.environ["RAW_ONESIGNAL_URL"]
        self.onesignal_app = os.environ["RAW_ONESIGNAL_APP_ID"]
        self.onesignal_key = os.environ["RAW_ONESIGNAL_KEY"]
        self.knock = os.environ["RAW_KNOCK_URL"]
        self.knock_key = os.environ["RAW_KNOCK_KEY"]
        self.ably = os.environ["RAW_ABLY_URL"]
        self.ably_auth = "Basic " + base64.b64encode(os.environ["RAW_ABLY_KEY"].encode()).decode()
        self.cert = os.environ["RAW_CA_FILE"]
        self.catalog = load_catalog()
        self.pool: Any = None
        self.http: httpx.AsyncClient | None = None
        self.wake = asyncio.Event()
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.concurrency * 2)
        self.done: list[Any] = []

    async def post_event(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(token, self.key):
            return JSONResponse({"title": "unauthorized"}, status_code=401)
        raw = await request.body()
        body = json.loads(raw)
        event_type = self.catalog.get(body["type"])
        if event_type is None:
            return JSONResponse({"title": "unknown type"}, status_code=422)
        named = list(dict.fromkeys(r if isinstance(r, str) else r["id"] for r in body.get("recipients") or []))
        organization, roles = audience_of(event_type, body, named)
        if not named and body.get("audience") is None and event_type.recipient_field:
            named = [str(body["data"][event_type.recipient_field])]
        present = await self.present(event_type, body["data"])
        now = dt.datetime.now(dt.UTC)
        event_id = uuid.uuid4()
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetch(RECIPIENTS, named, organization, roles)
            documents = {r["id"]: r["document"] for r in found if r["document"] is not None}
            recipients = list(dict.fromkeys([*named, *(r["id"] for r in found)]))
            inserted = await conn.fetchval(
                "INSERT INTO events (id, type, idempotency_key, body_hash, organization_id, actor, data, recipients,"
                " source, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, 'api', $9)"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                event_id,
                body["type"],
                body.get("idempotency_key"),
                hashlib.sha256(raw).hexdigest(),
                body.get("organization_id"),
                body.get("actor"),
                json.dumps(body["data"]),
                json.dumps(recipients),
                now,
            )
            if inserted is None:  # a repeat: answer with the original deliveries
                rows = await conn.fetch(
                    "SELECT d.id, d.user_id, d.channel, d.status, d.reason FROM deliveries d JOIN events e"
                    " ON e.id = d.event_id WHERE e.idempotency_key = $1",
                    body.get("idempotency_key"),
                )
                deliveries = [dict(r) | {"id": str(r["id"])} for r in rows]
                return JSONResponse({"event_id": None, "duplicate": True, "deliveries": deliveries})
            rows = []
            for user_id in recipients:
                document = json.loads(documents[user_id]) if user_id in documents else {}
                for channel, status, reason in plan(event_type, user_id, document, now, user_id in present):
                    rows.append(
                        (uuid.uuid4(), event_id, body["type"], user_id, channel, PROVIDERS[channel], status, reason)
                    )
            await conn.executemany(
                f"INSERT INTO deliveries ({DELIVERY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, 0, 0,"
                " $9, $9)",
                [(*row, now) for row in rows],
            )
            await conn.executemany(
                "INSERT INTO delivery_transitions (id, delivery_id, from_status, to_status, reason, note, at)"
                " VALUES ($1, $2, NULL, $3, $4, NULL, $5)",
                [(uuid.uuid4(), row[0], row[6], row[7], now) for row in rows],
            )
        self.wake.set()
        deliveries = [{"id": str(r[0]), "user_id": r[3], "channel": r[4], "status": r[6], "reason": r[7]} for r in rows]
        return JSONResponse({"event_id": str(event_id), "duplicate": False, "deliveries": deliveries}, status_code=202)

    async def present(self, event_type: Any, data: dict[str, Any]) -> set[str]:
        """The client ids present on the type's presence channel (none when it has none or Ably fails)."""
        if not event_type.presence_channel:
            return set()
        assert self.http is not None
        name = PLACEHOLDER.sub(lambda m: str(data[m[1]]), event_type.presence_channel)
        try:
            reply = await self.http.get(
                f"{self.ably}/channels/{quote_plus(name)}/presence",
                params={"limit": 1000},
                headers={"Authorization": self.ably_auth},
            )
            members = reply.json() if reply.is_success else []
        except (httpx.HTTPError, ValueError):
            return set()
        return {str(m["clientId"]) for m in members if m.get("clientId") and m.get("action", 2) in PRESENT_ACTIONS}

    async def feed(self) -> None:
        """Claim due queued rows in batches and hand them to the senders."""
        while True:
            free = self.queue.maxsize - self.queue.qsize()
            rows: list[Any] = []
            if free > 0:
                async with self.pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(
                        "WITH c AS (SELECT id FROM deliveries WHERE status = 'queued' ORDER BY created_at LIMIT $1"
                        " FOR UPDATE SKIP LOCKED) UPDATE deliveries d SET status = 'sending', claimed_until ="
                        " now() + interval '60 seconds', attempts = d.attempts + 1 FROM c WHERE d.id = c.id"
                        " RETURNING d.id, d.event_id, d.event_type, d.user_id, d.channel, d.attempts",
                        free,
                    )
                    if rows:
                        ids = [r["id"] for r in rows]
                        await conn.execute(
                            "INSERT INTO delivery_attempts (id, delivery_id, number, started_at, via)"
                            " SELECT gen_random_uuid(), u.id, u.n, now(), 'local'"
                            " FROM unnest($1::uuid[], $2::int[]) AS u(id, n)",
                            ids,
                            [r["attempts"] for r in rows],
                        )
                        await conn.execute(
                            "INSERT INTO delivery_transitions (id, delivery_id, from_status, to_status, at)"
                            " SELECT gen_random_uuid(), id, 'queued', 'sending', now() FROM unnest($1::uuid[]) AS id",
                            ids,
                        )
                        events = dict(
                            await conn.fetch(
                                "SELECT id, data FROM events WHERE id = ANY($1)", list({r["event_id"] for r in rows})
                            )
                        )
                        emails = dict(
                            await conn.fetch(
                                "SELECT id, email FROM users WHERE id = ANY($1)", list({r["user_id"] for r in rows})
                            )
                        )
                for row in rows:
                    self.queue.put_nowait((row, json.loads(events[row["event_id"]]), emails.get(row["user_id"])))
            if rows and self.queue.qsize() < self.queue.maxsize:
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5 if not self.queue.full() else 0.005):
                    await self.wake.wait()

    async def send(self) -> None:
        assert self.http is not None
        while True:
            row, data, email = await self.queue.get()
            delivery_id, user_id, channel = str(row["id"]), row["user_id"], row["channel"]
            title, text = f"{row['event_type']}", json.dumps(data)[:200]
            try:
                provider_id, code = await self._call(channel, row, delivery_id, user_id, email, title, text, data)
            except httpx.HTTPError:
                provider_id, code = None, None
            self.done.append((row, provider_id, code, title, text, data))

    async def _call(
        self, channel: str, row: Any, delivery_id: str, user_id: str, email: Any, title: str, text: str, data: Any
    ) -> tuple[str | None, int]:
        """(provider message id, or None if the provider refused; HTTP status) of the delivery's one call."""
        assert self.http is not None
        key: str | None = None  # where the reply carries the provider's id (Ably: the delivery id is the id)
        if channel == "push":
            reply = await self.http.post(
                f"{self.onesignal}/notifications",
                headers={"Authorization": f"Key {self.onesignal_key}"},
                json={
                    "app_id": self.onesignal_app,
                    "include_aliases": {"external_id": [user_id]},
                    "target_channel": "push",
                    "headings": {"en": title},
                    "contents": {"en": text},
                    "data": data,
                    "idempotency_key": str(uuid.uuid5(NAMESPACE, delivery_id)),
                },
            )
            key = "id"
        elif channel == "email":
            workflow = row["event_type"].replace(".", "-")
            reply = await self.http.post(
                f"{self.knock}/v1/workflows/{workflow}/trigger",
                headers={"Authorization": f"Bearer {self.knock_key}", "Idempotency-Key": delivery_id},
                json={"recipients": [{"id": user_id, "email": email}], "data": {**data, "title": title}},
            )
            key = "workflow_run_id"
        else:
            reply = await self.http.post(
                f"{self.ably}/channels/notifications:{user_id}/messages",
                headers={"Authorization": self.ably_auth},
                json={"name": row["event_type"], "id": delivery_id, "data": json.dumps(data)},
            )
        if not reply.is_success:
            return None, reply.status_code
        return (str(reply.json()[key]) if key else delivery_id), reply.status_code

    async def mark(self) -> None:
        """Every few ms, record everything sent since the last flush in one transaction."""
        while True:
            await asyncio.sleep(0.005)
            if not self.done:
                continue
            batch, self.done = self.done, []
            now = dt.datetime.now(dt.UTC)
            ids, pids = [b[0]["id"] for b in batch], [b[1] for b in batch]
            statuses = ["failed" if pid is None else "sent" for pid in pids]
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE deliveries d SET status = u.status, provider_message_id = u.pid, sent_at = $4,"
                    " updated_at = $4, claimed_until = NULL"
                    " FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(id, pid, status) WHERE d.id = u.id",
                    ids,
                    pids,
                    statuses,
                    now,
                )
                await conn.execute(
                    "UPDATE delivery_attempts a SET finished_at = $6, outcome = u.status, provider_message_id = u.pid,"
                    " http_status = u.code FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::int[])"
                    " AS u(id, n, pid, status, code) WHERE a.delivery_id = u.id AND a.number = u.n",
                    ids,
                    [b[0]["attempts"] for b in batch],
                    pids,
                    statuses,
                    [b[2] for b in batch],
                    now,
                )
                await conn.execute(
                    "INSERT INTO delivery_transitions (id, delivery_id, from_status, to_status, at)"
                    " SELECT gen_random_uuid(), u.id, 'sending', u.status, $3"
                    " FROM unnest($1::uuid[], $2::text[]) AS u(id, status)",
                    ids,
                    statuses,
                    now,
                )
                inbox = [b for b in batch if b[0]["channel"] == "in_app"]
                if inbox:
                    await conn.executemany(
                        "INSERT INTO inbox_messages (id, user_id, delivery_id, event_id, event_type, title, body,"
                        " data, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)"
                        " ON CONFLICT (delivery_id) DO NOTHING",
                        [
                            (
                                uuid.uuid4(),
                                r["user_id"],
                                r["id"],
                                r["event_id"],
                                r["event_type"],
                                t,
                                x,
                                json.dumps(d),
                                now,
                            )
                            for r, _, _, t, x, d in inbox
                        ],
                    )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=4, max_size=self.concurrency + 4)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self.http = httpx.AsyncClient(limits=limits, verify=ssl.create_default_context(cafile=self.cert), timeout=10)
        tasks = [asyncio.create_task(self.feed()), asyncio.create_task(self.mark())]
        tasks += [asyncio.create_task(self.send()) for _ in range(self.concurrency)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.http.aclose()
            await self.pool.close()


def raw_app() -> Starlette:
    raw = Raw()
    return Starlette(routes=[Route("/v1/events", raw.post_event, methods=["POST"])], lifespan=raw.lifespan)
