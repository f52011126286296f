"""Async engine, sessions and schema migrations (asyncpg in production, aiosqlite embedded)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from notifier.errors import ConfigurationError

# The Alembic scripts live in the top-level ``migrations/`` folder of the source tree and are installed as the
# ``notifier.migrations`` package (a package-dir mapping in pyproject.toml), so an installed wheel migrates too.
MIGRATION_PACKAGE = "notifier.migrations"


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """Build the engine; on SQLite, WAL mode and writer serialisation so concurrent workers don't collide."""
    if database_url.startswith("sqlite"):
        engine = create_async_engine(database_url, connect_args={"timeout": 30})
        _serialise_sqlite_writers(engine)
        return engine
    # No pre-ping: it cost a rolled-back transaction per checkout (half of all transactions, measured in
    # bench/). A dead connection fails its statement, is invalidated, and the attempt or request is retried.
    return create_async_engine(
        database_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False, pool_recycle=1800
    )


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
        raise ConfigurationError(f"cannot reach the database: {type(exc).__name__}") from exc
    if not migrated:
        raise ConfigurationError("the database schema is not current; run `notifier migrate` first")


def refused_values(exc: BaseException) -> bool:
    """Whether ``exc`` is the database refusing a statement's values (SQLSTATE class 22, "data exception": a
    value too long, a character the encoding cannot hold ...), as opposed to a lost connection or our bug."""
    if isinstance(exc, sa.exc.DataError):
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(exc, sa.exc.DBAPIError) and isinstance(sqlstate, str) and sqlstate.startswith("22")
