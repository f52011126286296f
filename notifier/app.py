"""The wiring: the application factory (routes, middleware, error handlers, the lifespan that owns every
resource) and the worker process, both built on one ``delivery_core``. The only module that knows them all."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from notifier import db
from notifier.api import (
    callbacks,
    component,
    dashboard,
    deliveries,
    events,
    inbox,
    ops,
    pages,
    preferences,
    realtime,
    users,
)
from notifier.api.auth import guard
from notifier.api.common import ApiRoute, Endpoint
from notifier.api.cors import InboxCorsMiddleware
from notifier.api.failure_caps import FailureCaps
from notifier.api.middleware import RequestLogMiddleware
from notifier.api.openapi import build_openapi
from notifier.api.problems import EXCEPTION_HANDLERS, UnexpectedErrorMiddleware
from notifier.api.signin_limit import SignInLimiter
from notifier.catalog import Catalog, load_catalog
from notifier.channels.ably import AblyRealtime
from notifier.channels.base import Channel
from notifier.channels.in_app import InboxChannel
from notifier.channels.knock import KnockEmail
from notifier.channels.onesignal import OneSignalPush
from notifier.channels.registry import ChannelRegistry
from notifier.channels.smtp import SmtpEmail
from notifier.config import Settings, api_key_problem, check_startup, startup_warnings
from notifier.delivery.inbox_store import DatabaseInboxStore
from notifier.delivery.recovery import QStashRecovery
from notifier.delivery.runner import DeliveryRunner
from notifier.delivery.state import DeliveryStates
from notifier.dispatch.base import Dispatcher
from notifier.dispatch.local import LocalDispatcher
from notifier.dispatch.notify import DeliveryListener, NotifyDispatcher, connector
from notifier.dispatch.qstash import QStashDispatcher
from notifier.errors import ConfigurationError
from notifier.heap import tune_garbage_collector
from notifier.ingest.events import EventIntake
from notifier.metrics import Metrics
from notifier.runtime import Runtime
from notifier.security import Authenticator, QStashVerifier, ensure_embedded_api_key
from notifier.types import ChannelName

log = logging.getLogger("notifier")

API_ROUTES: Sequence[ApiRoute] = (
    *ops.ROUTES,
    *events.ROUTES,
    *users.ROUTES,
    *preferences.ROUTES,
    *inbox.ROUTES,
    *realtime.ROUTES,
    *pages.ROUTES,
    *component.ROUTES,
    *deliveries.ROUTES,
    *dashboard.ROUTES,
    *callbacks.ROUTES,
)


def package_version() -> str:
    try:
        return version("notifier")
    except PackageNotFoundError:
        return "0.0.0"


def build_channels(settings: Settings, store: DatabaseInboxStore, realtime: AblyRealtime | None) -> ChannelRegistry:
    """One provider per channel; email prefers Knock and falls back to SMTP; the inbox is always live."""
    email: Channel | None = KnockEmail.from_settings(settings) or SmtpEmail.from_settings(settings)
    candidates: list[Channel | None] = [OneSignalPush.from_settings(settings), email, InboxChannel(store, realtime)]
    return ChannelRegistry(channel for channel in candidates if channel is not None)


@dataclass(frozen=True)
class DeliveryCore:
    """What the API process and a ``notifier worker`` process both run on, built by ``delivery_core``."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    catalog: Catalog
    realtime: AblyRealtime | None
    channels: ChannelRegistry
    metrics: Metrics
    states: DeliveryStates
    runner: DeliveryRunner


@contextlib.asynccontextmanager
async def delivery_core(settings: Settings) -> AsyncIterator[DeliveryCore]:
    """Build the database engine, catalog, channels and delivery runner; close them in reverse order on exit.

    Raises ``ConfigurationError`` when a PostgreSQL schema is not current (SQLite is migrated here).
    """
    async with contextlib.AsyncExitStack() as stack:
        catalog = _load_catalog(settings)
        engine = db.create_engine(settings.database_url, pool_size=settings.db_pool_size)
        stack.push_async_callback(engine.dispose)
        if settings.is_sqlite:
            await db.migrate(engine)  # the embedded default keeps its own file current
        else:
            await db.check_schema(engine)
        sessions = db.create_session_factory(engine)
        realtime = AblyRealtime.from_settings(settings)
        if realtime is not None:
            stack.push_async_callback(realtime.aclose)
        channels = build_channels(settings, DatabaseInboxStore(sessions), realtime)
        stack.push_async_callback(channels.aclose)
        channels.log_live()
        if (warning := relative_email_links_warning(settings, catalog, channels)) is not None:
            log.warning("%s", warning)
        metrics = Metrics()
        states = DeliveryStates(metrics)
        runner = DeliveryRunner(
            sessions=sessions, catalog=catalog, channels=channels, settings=settings, metrics=metrics, states=states
        )
        yield DeliveryCore(engine, sessions, catalog, realtime, channels, metrics, states, runner)


def relative_email_links_warning(settings: Settings, catalog: Catalog, channels: ChannelRegistry) -> str | None:
    """Why the emails this process sends will link nowhere, or None: an email provider is live, the catalog has
    relative action URLs on email, and ``NOTIFIER_APP_URL`` is not set to make them absolute. A warning, not a
    refusal: the templates may not show the link, or a Knock workflow may build its own."""
    if settings.app_url or channels.get(ChannelName.email) is None:
        return None
    names = catalog.relative_email_links()
    if not names:
        return None
    example = catalog.types[names[0]].action_url
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"NOTIFIER_APP_URL is not set: emails of {shown} link to relative action URLs (like {example}) that a mail "
        "client cannot open; set it to your web app's address, e.g. https://app.example.com"
    )


def build_local_dispatcher(settings: Settings, core: DeliveryCore) -> LocalDispatcher:
    return LocalDispatcher(
        sessions=core.sessions,
        runner=core.runner,
        workers=settings.workers,
        poll_interval=settings.poll_interval_seconds,
        lease_seconds=settings.claim_lease_seconds,
        grace_seconds=settings.shutdown_grace_seconds,
    )


def build_dispatcher(settings: Settings, core: DeliveryCore) -> Dispatcher:
    """The API process's dispatcher: QStash, the local dispatcher, or a NOTIFY to separate worker processes."""
    if settings.effective_dispatcher == "qstash":
        return QStashDispatcher.from_settings(settings)
    if not settings.embedded_dispatcher:
        return NotifyDispatcher(connect=connector(core.engine, application_name="notifier-notify"))
    return build_local_dispatcher(settings, core)


@dataclass(frozen=True)
class Worker:
    """A running ``notifier worker``: its resources, its local dispatcher and the listener that wakes it."""

    core: DeliveryCore
    dispatcher: LocalDispatcher
    listener: DeliveryListener


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Run the local dispatcher without the HTTP API, woken by NOTIFY; on exit drain it and close everything.

    Raises ``ConfigurationError`` on SQLite, in QStash mode, or on an unmigrated schema.
    """
    check_startup(settings, "worker")
    async with contextlib.AsyncExitStack() as stack:
        core = await stack.enter_async_context(delivery_core(settings))
        dispatcher = build_local_dispatcher(settings, core)
        await dispatcher.start()
        stack.push_async_callback(dispatcher.aclose)
        listener = DeliveryListener(
            connect=connector(core.engine, application_name="notifier-listen"), dispatcher=dispatcher
        )
        await listener.start()
        stack.push_async_callback(listener.aclose)
        gc_tuned = tune_garbage_collector()
        log.info(
            "notifier worker ready",
            extra={
                "dispatcher": dispatcher.name,
                "database": core.engine.dialect.name,
                "workers": settings.workers,
                "listening": listener.listening.is_set(),
                "gc_tuned": gc_tuned,
            },
        )
        yield Worker(core, dispatcher, listener)


def preflight(settings: Settings, role: Literal["serve", "serverless"]) -> None:
    """Raise ``ConfigurationError`` for what would stop the app's lifespan, checked before any server starts.

    Inside the lifespan a refusal reaches the user as uvicorn's "Application startup failed" with a traceback;
    here it is one line. Checks ``check_startup`` for ``role``, a ``NOTIFIER_CATALOG_PATH`` file (the built-in
    catalog is tested; parsing it twice would only lengthen a serverless cold start) and the embedded default's
    key file (if it exists yet: the lifespan creates it). The lifespan checks them again, for callers of
    ``create_app`` that skip this.
    """
    check_startup(settings, role)
    if settings.catalog_path is not None:
        _load_catalog(settings)
    key_file = _embedded_key_file(settings)
    if key_file is not None and key_file.exists():
        _read_embedded_key(key_file)


def _load_catalog(settings: Settings) -> Catalog:
    try:
        return load_catalog(settings.catalog_path)
    except ConfigurationError as exc:  # only a NOTIFIER_CATALOG_PATH file can be wrong: the built-in one is tested
        raise ConfigurationError(f"invalid configuration: NOTIFIER_CATALOG_PATH: {exc.detail}") from exc


def _embedded_key_file(settings: Settings) -> Path | None:
    """Where the embedded default keeps its generated key, when no ``NOTIFIER_API_KEYS`` are set (``check_startup``
    ensured that only the SQLite default gets here without keys)."""
    return None if settings.api_keys else settings.default_api_key_file


def _read_embedded_key(key_file: Path) -> tuple[str, bool]:
    """(key, created) from ``ensure_embedded_api_key``; raise ``ConfigurationError`` for a key that would not be
    accepted in NOTIFIER_API_KEYS (a hand-edited file)."""
    key, created = ensure_embedded_api_key(key_file)
    problem = api_key_problem(key)
    if problem is not None:
        raise ConfigurationError(f"the API key in {key_file.resolve()} {problem}")
    return key, created


def _generated_api_keys(settings: Settings) -> tuple[str, ...]:
    """The embedded default's generated key when no ``NOTIFIER_API_KEYS`` are set, else nothing."""
    key_file = _embedded_key_file(settings)
    if key_file is None:
        return ()
    key, created = _read_embedded_key(key_file)
    log.warning(
        "%s API key in %s (readable by its owner only); send it as 'Authorization: Bearer <key>'",
        "generated an" if created else "using the",
        key_file.resolve(),
    )
    return (key,)


def _endpoint(route: ApiRoute) -> Endpoint:
    """What Starlette serves for ``route``: its handler behind ``guard``, inside the one edge where the database
    saying "not now" (down, restarting, out of connections) becomes ``NotReady``: 503 with Retry-After."""
    guarded = guard(route)

    async def endpoint(request: Request) -> Response:
        with db.unavailable_as_not_ready():
            return await guarded(request)

    endpoint.__name__ = guarded.__name__
    return endpoint


def _routes(api_routes: Sequence[ApiRoute]) -> list[Route | Mount]:
    """One Starlette route per path, serving each of its methods: a 405 then lists every method the path allows
    (``Allow``), where a route per method would list only the first matching route's."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for route in api_routes:
        by_path.setdefault(route.path, {})[route.method] = _endpoint(route)
    return [
        Route(path, _by_method(endpoints), methods=list(endpoints), name=path) for path, endpoints in by_path.items()
    ]


def _by_method(endpoints: Mapping[str, Endpoint]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        # Starlette lets HEAD through wherever GET is allowed; it is answered as GET (the server drops the body).
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


def create_app(settings: Settings) -> Starlette:
    """Build the ASGI app; nothing is connected until the lifespan starts (which refuses settings that cannot work)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        check_startup(settings, "serve")
        for warning in startup_warnings(settings):
            log.warning("%s", warning)
        async with contextlib.AsyncExitStack() as stack:
            core = await stack.enter_async_context(delivery_core(settings))
            authenticator = Authenticator.from_settings(settings, extra_api_keys=_generated_api_keys(settings))
            dispatcher = build_dispatcher(settings, core)
            app.state.runtime = Runtime(
                settings=settings,
                engine=core.engine,
                sessions=core.sessions,
                catalog=core.catalog,
                channels=core.channels,
                authenticator=authenticator,
                qstash=QStashVerifier.from_settings(settings),
                states=core.states,
                intake=EventIntake(
                    sessions=core.sessions,
                    catalog=core.catalog,
                    channels=core.channels,
                    presence=core.realtime,
                    states=core.states,
                    digest_window=dt.timedelta(seconds=settings.chat_digest_seconds),
                    send_groups=settings.send_groups,
                ),
                runner=core.runner,
                recovery=QStashRecovery(
                    sessions=core.sessions, states=core.states, runner=core.runner, max_retries=settings.max_retries
                ),
                dispatcher=dispatcher,
                metrics=core.metrics,
                realtime=core.realtime,
            )
            await dispatcher.start()
            stack.push_async_callback(dispatcher.aclose)
            gc_tuned = tune_garbage_collector()
            log.info(
                "notifier ready",
                extra={"dispatcher": dispatcher.name, "database": core.engine.dialect.name, "gc_tuned": gc_tuned},
            )
            yield

    routes: list[Route | Mount] = _routes(API_ROUTES)
    routes.append(Mount("/docs/static", StaticFiles(directory=ops.SWAGGER_UI_DIR), name="docs-static"))
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLogMiddleware),
            Middleware(InboxCorsMiddleware, origins=settings.cors_origins),
            Middleware(UnexpectedErrorMiddleware),  # inside CORS: a browser can read its 500 too
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.openapi = build_openapi(API_ROUTES, version=package_version())
    app.state.signin_limiter = SignInLimiter()  # failed dashboard sign-ins per client address, this process only
    app.state.failure_caps = FailureCaps.from_settings(settings)  # failed authentications from all addresses
    return app
