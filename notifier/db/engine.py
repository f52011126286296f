"""Async engine, sessions and schema migrations (asyncpg in production, aiosqlite embedded); and the one edge
where the driver's "the database cannot serve now" errors become ``NotReady``.

A request that needs the database while it is down, restarting, out of connections or locked answers 503 with
``Retry-After`` (``unavailable_as_not_ready`` around every route), never 500: the caller should retry, and
will succeed once the database is back. Errors that are our bug (a bad query, a missing table, a constraint
we did not expect) stay what they are and answer 500.

=========================================  ====================================================================
raised by the driver                       why it is ``NotReady``
=========================================  ====================================================================
``OSError`` while connecting               refused, reset, unreachable, timed out (asyncpg lets these through
                                           raw; the engine's connect hook raises ``NotReady`` from them)
``DBAPIError``, connection invalidated     the connection died under a statement (killed, server restart)
SQLSTATE class 08                          connection exception (e.g. 08003 connection does not exist)
SQLSTATE class 53                          insufficient resources (53300 too many connections, out of memory)
SQLSTATE 57P01, 57P02, 57P03               admin shutdown, crash shutdown, cannot connect now (starting up)
``sqlalchemy.exc.TimeoutError``            no pooled connection free within the pool timeout
SQLite ``SQLITE_BUSY``, ``SQLITE_CANTOPEN``  locked past the busy timeout; the file cannot be opened
=========================================  ====================================================================
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from notifier.db import driver
from notifier.db.sql import dialect_of
from notifier.errors import ConfigurationError, NotReady
from notifier.types import utcnow

# The Alembic scripts live in the top-level ``migrations/`` folder of the source tree and are installed as the
# ``notifier.migrations`` package (a package-dir mapping in pyproject.toml), so an installed wheel migrates too.
MIGRATION_PACKAGE = "notifier.migrations"


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """Build the engine; on SQLite, WAL mode and writer serialisation so concurrent workers don't collide.

    On PostgreSQL the pool keeps ``pool_size`` connections and opens up to as many again for a burst.

    A connection that cannot be made (refused, unreachable, timed out) raises ``NotReady``.
    """
    # An error's text names the statement, never the values bound to it (addresses, tokens).
    if database_url.startswith("sqlite"):
        engine = create_async_engine(database_url, connect_args={"timeout": 30}, hide_parameters=True)
        _serialise_sqlite_writers(engine)
    else:
        # No pre-ping: it cost a rolled-back transaction per checkout (half of all transactions, measured in
        # bench/). A dead connection fails its statement, is invalidated, and the attempt or request is retried.
        engine = create_async_engine(
            database_url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=False,
            pool_recycle=1800,
            hide_parameters=True,
        )
    _unreachable_as_not_ready(engine)
    return engine


def _unreachable_as_not_ready(engine: AsyncEngine) -> None:
    # asyncpg lets the socket's own errors through unwrapped (ConnectionRefusedError, a connect timeout): only
    # here is it certain that they came from the database, so they become NotReady here.
    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: sa.Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except OSError as exc:
            raise NotReady("the database is unreachable") from exc


# SQLSTATE classes and codes that say "the server cannot serve this connection now" (see the module docstring).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03")
_UNAVAILABLE_SQLITE = {sqlite3.SQLITE_BUSY: "the database is locked", sqlite3.SQLITE_CANTOPEN: "cannot open it"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it came from: the wrapped driver error (``orig``), its cause or (unsuppressed) context."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and orig is not current:
            current = orig
        elif current.__cause__ is not None or current.__suppress_context__:
            current = current.__cause__
        else:
            current = current.__context__


def unavailable(exc: BaseException) -> str | None:
    """Why the database cannot serve now, if that is what ``exc`` says (None: anything else, e.g. our bug).

    The reason is short and never quotes the driver (which may name hosts or users).
    """
    for link in _causes(exc):
        if isinstance(link, NotReady):
            return link.detail or "the database is unavailable"
        if isinstance(link, sa.exc.TimeoutError):
            return "no database connection is free"
        if isinstance(link, sa.exc.DBAPIError) and link.connection_invalidated:
            return "the database connection was lost"
        sqlstate = getattr(link, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return f"the database cannot serve now (SQLSTATE {sqlstate})"
        code = getattr(link, "sqlite_errorcode", None) if isinstance(link, sqlite3.Error) else None
        if isinstance(code, int) and (reason := _UNAVAILABLE_SQLITE.get(code & 0xFF)):  # primary of an extended code
            return reason
    return None


@contextlib.contextmanager
def unavailable_as_not_ready() -> Iterator[None]:
    """Let everything through except what says the database cannot serve now: that becomes ``NotReady``."""
    try:
        yield
    except NotReady:
        raise
    except Exception as exc:
        reason = unavailable(exc)
        if reason is None:
            raise
        raise NotReady(reason) from exc


def _serialise_sqlite_writers(engine: AsyncEngine) -> None:
    # SQLite upgrades a read lock to a write lock lazily and fails with "database is locked" when two
    # transactions race; BEGIN IMMEDIATE takes the write lock up front so they queue instead.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


async def snapshot(session: AsyncSession) -> None:
    """Make every read of ``session``'s transaction, which has not begun, see the database as of one moment.

    PostgreSQL's default (READ COMMITTED) gives each statement a snapshot of its own, so a row and its history
    read in two statements may disagree when a worker commits in between; REPEATABLE READ gives the transaction
    one. SQLite's transactions (BEGIN IMMEDIATE here) already read one state."""
    if dialect_of(session) == "postgresql":
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


async def transaction_time(session: AsyncSession | driver.Lent) -> dt.datetime:
    """Now, once ``session``'s transaction holds its connection (on SQLite the write lock, which its BEGIN
    IMMEDIATE may have queued for behind other writers; a lent connection holds it already). A time taken before
    that wait would date this transaction's rows before those of the transactions it waited behind: a delivery's
    history would read out of order."""
    if isinstance(session, AsyncSession):
        await session.connection()
    return utcnow()


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files(MIGRATION_PACKAGE)))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url)
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def migrate(engine: AsyncEngine) -> None:
    """Upgrade the database behind ``engine`` to the latest schema (idempotent)."""

    def _upgrade(connection: sa.Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


async def current_revision(engine: AsyncEngine) -> str | None:
    def _current(connection: sa.Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def is_migrated(engine: AsyncEngine) -> bool:
    return await current_revision(engine) == head_revision()


async def readiness(engine: AsyncEngine) -> str | None:
    """None when the database answers and its schema is current, else what is wrong (for a 503's detail)."""
    try:
        try:
            migrated = await is_migrated(engine)
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # A pooled connection the server had closed (a restart, a failover, an idle timeout): connections
            # are not pinged before use, so the pool learns it here and drops them. Ask once more on a fresh
            # one before calling a healthy database unreachable.
            migrated = await is_migrated(engine)
    except Exception:
        return "the database is unreachable"
    return None if migrated else "the database schema is not migrated; run `notifier migrate`"


async def check_schema(engine: AsyncEngine) -> None:
    """Raise ``ConfigurationError`` unless the database answers and its schema is current."""
    try:
        migrated = await is_migrated(engine)
    except Exception as exc:
        reason = _root_cause(exc).replace(engine.url.password or "\0", "***")  # no driver quotes it; in case one does
        raise ConfigurationError(f"cannot connect to the database at {_where(engine.url)}: {reason}") from exc
    if not migrated:
        raise ConfigurationError("the database schema is not current; run `notifier migrate` first")


def _where(url: sa.URL) -> str:
    """host:port/database, as the driver will use them (its defaults when the URL leaves them out); never the
    password."""
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or url.username or ''}"


def _root_cause(exc: BaseException) -> str:
    """What the driver or the socket said, under SQLAlchemy's and our wrappers: its class and first line (an
    address, a user or a database name: what the operator needs to tell a wrong host from a wrong password)."""
    *_, root = _causes(exc)
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def refused_values(exc: BaseException) -> bool:
    """Whether ``exc`` is the database refusing a statement's values (SQLSTATE class 22, "data exception": a
    value too long, a character the encoding cannot hold ...), as opposed to a lost connection or our bug."""
    if isinstance(exc, sa.exc.DataError):
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(exc, sa.exc.DBAPIError) and isinstance(sqlstate, str) and sqlstate.startswith("22")
