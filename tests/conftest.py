"""Fixtures shared by the whole suite. Provider fakes register their fixtures as plugins.

Databases: every test that asks for ``database_url`` runs twice, on a fresh SQLite file and on
a real PostgreSQL database (migrated once per session with Alembic, truncated before each test).
PostgreSQL is found at ``NOTIFIER_TEST_POSTGRES`` (default: 127.0.0.1:5432, database ``test``);
if it is unreachable its tests are skipped — except under ``CI=true``, where that is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from notifier import db
from notifier.app import create_app
from notifier.config import Settings
from notifier.runtime import Runtime
from tests.db_faults import dsn_of

pytest_plugins = [
    "tests.fakes.onesignal",
    "tests.fakes.knock",
    "tests.fakes.smtp",
    "tests.fakes.ably",
    "tests.fakes.qstash",
]

SERVICE_KEY = "test-service-key-0123456789-abcdefghij"
USER_JWT_SECRET = "test-user-jwt-secret-0123456789-abcdefghij"
PG_ADMIN = os.environ.get("NOTIFIER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = (
    "delivery_transitions",
    "delivery_attempts",
    "inbox_messages",
    "deliveries",
    "events",
    "preference_changes",
    "preferences",
    "organization_preferences",
    "users",
    "revoked_credentials",
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


async def _create_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _asyncpg_url(name: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def _migrate(url: str) -> None:
    engine = db.create_engine(url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str | None]:
    """A migrated PostgreSQL database for this test session (None when PostgreSQL is unreachable)."""
    name = f"notifier_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        asyncio.run(_create_database(name))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL is required under CI=true but unreachable at {PG_ADMIN}: {exc}")
        yield None
        return
    url = _asyncpg_url(name)
    asyncio.run(_migrate(url))
    yield url
    asyncio.run(_drop_database(name))


async def truncate_all(url: str) -> None:
    conn = await asyncpg.connect(dsn_of(url))
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated-on-start database: an SQLite file, or the session's truncated PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'notifier.db'}"
    url = request.getfixturevalue("postgres_database")
    if url is None:
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN} (set CI=true to make this an error)")
    asyncio.run(truncate_all(url))
    return str(url)


@pytest.fixture
def postgres_server() -> None:
    """The PostgreSQL server answers (for the bench's tests, which create databases of their own)."""

    async def ping() -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        await conn.close()

    try:
        asyncio.run(ping())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL is required under CI=true but unreachable at {PG_ADMIN}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN}")


@pytest.fixture
def postgres_url(postgres_database: str | None) -> str:
    """Only the PostgreSQL database (for tests of FOR UPDATE SKIP LOCKED, pg_terminate_backend, EXPLAIN)."""
    if postgres_database is None:
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN} (set CI=true to make this an error)")
    asyncio.run(truncate_all(postgres_database))
    return postgres_database


@pytest.fixture
async def postgres_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the PostgreSQL database (truncated, migrated), disposed of after the test."""
    engine = db.create_engine(postgres_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "api_keys": SERVICE_KEY,
        "user_jwt_secret": USER_JWT_SECRET,
        "retry_backoff_scale": 0.001,
        "poll_interval_seconds": 0.05,
        "provider_timeout_seconds": 2.0,
        "chat_digest_seconds": 0,
        "shutdown_grace_seconds": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


class RunningApp:
    """An app whose lifespan has started: its runtime, and the service key's header."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {SERVICE_KEY}"}


class Service(RunningApp):
    """An app running in-process with its lifespan, plus a client that speaks to it."""

    def __init__(self, app: Starlette, client: httpx.AsyncClient) -> None:
        super().__init__(app)
        self.client = client

    async def post_event(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.client.post("/v1/events", json=body, headers={**self.auth, **headers})

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.get(path, headers=self.auth, **kwargs)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until the local dispatcher has nothing due or in flight."""
        dispatcher = self.runtime.dispatcher
        await dispatcher.drain(timeout)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifier.test") as client:
            yield Service(app, client)


@pytest.fixture
def service_factory(database_url: str) -> Callable[..., contextlib.AbstractAsyncContextManager[Service]]:
    """``async with service_factory(**setting_overrides) as svc`` runs the app on this test's database."""

    def factory(**overrides: Any) -> contextlib.AbstractAsyncContextManager[Service]:
        return running_service(make_settings(database_url, **overrides))

    return factory


Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    """A session factory on this test's database, migrated, without the app (for store-level tests)."""
    engine = db.create_engine(database_url)
    await db.migrate(engine)
    try:
        yield db.create_session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def service(database_url: str) -> AsyncIterator[Service]:
    """The app on this test's database with only the inbox channel live."""
    async with running_service(make_settings(database_url)) as svc:
        yield svc


def booking_event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "booking.confirmed",
        "recipients": ["user-1"],
        "data": {"booking_id": "b-1", "guest_name": "Ann Lee", "property": "Seaview 4", "check_in": "2026-12-01"},
    }
    body.update(overrides)
    return body


class LiveService(RunningApp):
    """The real app under uvicorn on a loopback port (lifespan on), for browsers and QStash end-to-end tests."""

    def __init__(self, url: str, app: Starlette) -> None:
        super().__init__(app)
        self.url = url


@contextlib.contextmanager
def live_service(settings: Settings, *, port: int | None = None) -> Iterator[LiveService]:
    """Run ``create_app(settings)`` under uvicorn in a thread; stop it (running the lifespan's shutdown) on exit."""
    from tests.fakes.base import serve

    app = create_app(settings)
    with serve(app, port=port, lifespan="on") as served:
        yield LiveService(served.url, app)


def user_token(user_id: str, *, expires_in: int = 3600, secret: str = USER_JWT_SECRET) -> str:
    """An end-user JWT as the platform would mint it (HS256, sub, exp)."""
    import time

    import jwt

    return jwt.encode({"sub": user_id, "exp": int(time.time()) + expires_in}, secret, algorithm="HS256")
