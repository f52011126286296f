"""Wake separate ``notifier worker`` processes over PostgreSQL LISTEN/NOTIFY.

With ``NOTIFIER_EMBEDDED_DISPATCHER=false`` the API process attempts nothing itself. After the
transaction that queued deliveries commits, ``NotifyDispatcher`` sends ``NOTIFY notifier_deliveries``
with the ids of those that are due now; every worker holds a ``DeliveryListener`` whose connection
LISTENs on that channel and hands the ids to its local dispatcher, which claims them at once instead
of at its next poll. A notification is only a wake-up: the rows are the truth, so a lost one (a
dropped connection, a worker that was restarting) costs at most one poll interval, never a delivery.

Both sides use a dedicated asyncpg connection outside the engine's pool: a LISTEN must stay on one
connection for its whole life, and a NOTIFY on its own connection is one round trip that never
queues behind request traffic for a pooled connection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncEngine

from notifier.dispatch.base import Dispatcher, DispatchItem
from notifier.types import utcnow

log = logging.getLogger(__name__)

CHANNEL = "notifier_deliveries"
"""The PostgreSQL notification channel; the payload is comma-separated delivery ids (hex)."""

PAYLOAD_LIMIT = 7900  # PostgreSQL refuses a payload of 8000 bytes or more
IDS_PER_PAYLOAD = PAYLOAD_LIMIT // 33  # 32 hex digits and a comma each
NOTIFY_SQL = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"

NOTIFY_TIMEOUT_SECONDS = 2.0
"""Bound on connecting and sending a NOTIFY; beyond it the database is in trouble and the workers' poll covers."""
NOTIFY_RETRY_SECONDS = 1.0
"""After a failed NOTIFY, requests skip notifying for this long rather than each waiting out the timeout."""
LISTEN_START_SECONDS = 5.0
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 10.0
CHECK_SECONDS = 15.0
"""How often an idle LISTEN connection proves it is alive: a peer that vanished without closing never says so."""

# What talking to PostgreSQL can fail with: refused or reset sockets, our deadlines, server errors
# (terminated backend, too many connections, authentication), and asyncpg's own closed-connection errors.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

Connect = Callable[[], Awaitable[Any]]
"""Opens one dedicated ``asyncpg.Connection`` (asyncpg ships no type information, hence ``Any``)."""


def connector(engine: AsyncEngine, *, application_name: str, timeout: float = NOTIFY_TIMEOUT_SECONDS) -> Connect:
    """Return a function that opens a dedicated asyncpg connection to ``engine``'s database, outside its pool.

    The connection options are the ones the engine's own dialect derives from ``DATABASE_URL`` (host,
    credentials, ``ssl`` ...), minus SQLAlchemy's adapter-only options that ``asyncpg.connect`` rejects.
    ``application_name`` (unless the URL sets one) names the connection in ``pg_stat_activity``.
    """
    _, options = engine.dialect.create_connect_args(engine.url)
    accepted = inspect.signature(asyncpg.connect).parameters
    kwargs = {name: value for name, value in options.items() if name in accepted and name != "timeout"}
    kwargs["server_settings"] = {"application_name": application_name, **(kwargs.get("server_settings") or {})}

    async def connect() -> Any:
        return await asyncpg.connect(**kwargs, timeout=timeout)

    return connect


def encode_payloads(ids: Sequence[uuid.UUID]) -> list[str]:
    """Comma-separated hex ids, split so that no payload reaches PostgreSQL's 8000-byte limit."""
    return [
        ",".join(i.hex for i in ids[start : start + IDS_PER_PAYLOAD]) for start in range(0, len(ids), IDS_PER_PAYLOAD)
    ]


def decode_payload(payload: str) -> list[DispatchItem]:
    """The deliveries a notification names; a part that is not an id is skipped (someone else's NOTIFY)."""
    items = []
    for part in payload.split(","):
        try:
            items.append(DispatchItem(uuid.UUID(hex=part)))
        except ValueError:
            continue
    return items


def _is_due(item: DispatchItem, now: dt.datetime) -> bool:
    if item.not_before is None:
        return True
    not_before = item.not_before if item.not_before.tzinfo else item.not_before.replace(tzinfo=dt.UTC)
    return not_before <= now


class NotifyDispatcher:
    """The API side of a split deployment: tells the worker processes which deliveries are due, attempts none.

    Concurrent requests share one connection, and their NOTIFYs coalesce: a request that finds a
    NOTIFY in flight adds its ids to the next one, which is sent after its commit, so every committed
    delivery is announced after it is visible -- one round trip per burst, not per request.
    """

    name = "local"

    def __init__(self, *, connect: Connect, timeout: float = NOTIFY_TIMEOUT_SECONDS) -> None:
        self._connect = connect
        self._timeout = timeout
        self._connection: Any = None
        self._pending: list[uuid.UUID] = []
        self._lock = asyncio.Lock()
        self._quiet_until = 0.0  # monotonic; after a failure, NOTIFY is skipped until then
        self.notified = 0  # ids announced over the dispatcher's life
        self.failed = 0  # ids whose NOTIFY failed (left to the workers' poll)

    def __repr__(self) -> str:
        return f"NotifyDispatcher(channel={CHANNEL!r})"

    async def start(self) -> None:
        """Open the connection now, so the first request does not pay for it (a failure is retried later)."""
        log.info("deliveries are attempted by `notifier worker` processes, woken by NOTIFY", extra={"channel": CHANNEL})
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    self._connection = await self._connect()
            except CONNECTION_ERRORS as exc:
                log.warning(
                    "could not connect to notify the workers (%s); retrying at the next event", type(exc).__name__
                )

    async def dispatch(self, items: Sequence[DispatchItem]) -> int:
        """NOTIFY the ids of the items due now; return how many were announced (0 if the NOTIFY failed).

        Never raises for database trouble (the workers poll too). Deferred items are left out: no worker
        could claim them yet, and its poll finds them when due.
        """
        now = utcnow()
        due = [item.delivery_id for item in items if _is_due(item, now)]
        if not due:
            return 0
        self._pending.extend(due)
        async with self._lock:
            if not self._pending:
                return len(due)  # a NOTIFY sent after our commit already carried our ids
            ids, self._pending = self._pending, []
            return len(due) if await self._send(ids) else 0

    async def _send(self, ids: list[uuid.UUID]) -> bool:
        """NOTIFY ``ids``; False (logged, counted in ``failed``) when that did not work."""
        if time.monotonic() < self._quiet_until:
            self.failed += len(ids)
            return False
        payloads = encode_payloads(ids)
        try:
            try:
                await self._execute(payloads)
            except CONNECTION_ERRORS:
                if self._connection is None:
                    raise  # a fresh connection failed: the database is in trouble
                # An idle connection can go stale (the server restarted, an idle timeout): retry once on a new one.
                self._discard()
                await self._execute(payloads)
        except CONNECTION_ERRORS as exc:
            self.failed += len(ids)
            self._quiet_until = time.monotonic() + NOTIFY_RETRY_SECONDS
            self._discard()
            log.warning(
                "could not notify the workers of %d deliveries (%s); they stay queued for the workers' poll",
                len(ids),
                type(exc).__name__,
            )
            return False
        except asyncio.CancelledError:
            self._discard()  # cancelled mid-statement: the connection's state is unknown
            raise
        self.notified += len(ids)
        return True

    async def _execute(self, payloads: list[str]) -> None:
        """Send the NOTIFYs in one round trip, connecting first if needed; ``_connection`` stays None on failure."""
        async with asyncio.timeout(self._timeout):
            if self._connection is None or self._connection.is_closed():
                self._connection = None
                self._connection = await self._connect()
            await self._connection.execute(NOTIFY_SQL, CHANNEL, payloads)

    def _discard(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def aclose(self) -> None:
        async with self._lock:
            connection, self._connection = self._connection, None
            if connection is None:
                return
            try:
                async with asyncio.timeout(self._timeout):
                    await connection.close()
            except CONNECTION_ERRORS:
                connection.terminate()


class DeliveryListener:
    """The worker side: one connection LISTENs on ``CHANNEL`` and hands each notification's ids to ``dispatcher``.

    When the connection drops (the server closed it, or a periodic check got no answer) the listener
    reconnects, backing off while the database is unreachable; the dispatcher's poll goes on meanwhile,
    so nothing is lost -- deliveries are only found a poll interval later.
    """

    def __init__(self, *, connect: Connect, dispatcher: Dispatcher, check_seconds: float = CHECK_SECONDS) -> None:
        self._connect = connect
        self._dispatcher = dispatcher
        self._check_seconds = check_seconds
        self._task: asyncio.Task[None] | None = None
        self._wakes: set[asyncio.Task[None]] = set()
        self.listening = asyncio.Event()  # set while a LISTEN connection is up
        self.connections = 0  # LISTEN connections established so far (1 + reconnects)
        self.server_pid: int | None = None  # the backend of the current LISTEN connection
        self.woken = 0  # delivery ids handed to the dispatcher so far

    async def start(self) -> None:
        """Start listening; return once the first LISTEN is up, or after a few seconds of failing to connect."""
        self._task = asyncio.create_task(self._run(), name="notifier-listener")
        try:
            async with asyncio.timeout(LISTEN_START_SECONDS):
                await self.listening.wait()
        except TimeoutError:
            log.warning("not listening for deliveries yet; polling until the connection is up")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._wakes, return_exceptions=True)

    async def _run(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while True:
            established = self.connections
            try:
                await self._listen()
                problem = "the connection was closed"
            except CONNECTION_ERRORS as exc:
                problem = type(exc).__name__
            if self.connections > established:
                delay = RECONNECT_FIRST_SECONDS  # it worked until now: reconnect at once, back off only if that fails
            log.warning(
                "listening for deliveries stopped (%s); reconnecting in %.1fs, polling meanwhile", problem, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _listen(self) -> None:
        """LISTEN on one new connection until it is closed (return) or stops answering (raise)."""
        connection = await self._connect()
        try:
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _connection: lost.set())
            await connection.add_listener(CHANNEL, self._on_notification)
            self.server_pid = connection.get_server_pid()
            self.connections += 1
            self.listening.set()
            log.info("listening for deliveries", extra={"channel": CHANNEL, "connections": self.connections})
            while True:
                try:
                    async with asyncio.timeout(self._check_seconds):
                        await lost.wait()
                    return
                except TimeoutError:
                    pass
                async with asyncio.timeout(NOTIFY_TIMEOUT_SECONDS):
                    await connection.fetchval("SELECT 1")
        finally:
            self.listening.clear()
            if not connection.is_closed():
                connection.terminate()  # a LISTEN connection holds no work worth a graceful close

    def _on_notification(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        items = decode_payload(payload)
        if items:
            # Held in a set: the event loop keeps only a weak reference to a task.
            wake = asyncio.get_running_loop().create_task(self._wake(items))
            self._wakes.add(wake)
            wake.add_done_callback(self._wakes.discard)

    async def _wake(self, items: list[DispatchItem]) -> None:
        self.woken += len(items)
        try:
            await self._dispatcher.dispatch(items)
        except Exception:
            log.exception("waking the dispatcher for %d deliveries failed", len(items))


if TYPE_CHECKING:

    def _conforms(dispatcher: NotifyDispatcher) -> Dispatcher:
        return dispatcher
