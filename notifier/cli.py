"""The ``notifier`` command: serve, worker, migrate, retention, schedules sync, send-test."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from pydantic import ValidationError

from notifier import db
from notifier.config import Settings, check_startup, load_settings
from notifier.errors import ConfigurationError
from notifier.logs import configure_logging

log = logging.getLogger("notifier.cli")


async def _check_database(settings: Settings) -> None:
    """Refuse, before anything starts, a PostgreSQL database that is unreachable or not migrated (SQLite
    migrates itself)."""
    if settings.is_sqlite:
        return
    engine = db.create_engine(settings.database_url)
    try:
        await db.check_schema(engine)
    finally:
        await engine.dispose()


def forwarded_allow_ips(flag: str | None, environ: Mapping[str, str]) -> str:
    """The peers whose X-Forwarded-For and X-Forwarded-Proto are believed: ``--forwarded-allow-ips``, else uvicorn's
    own ``FORWARDED_ALLOW_IPS``, else only 127.0.0.1 (a proxy on this host). Anyone else's claims are ignored, so a
    client cannot pick the address the sign-in limits count it by."""
    return flag if flag is not None else environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from notifier.app import create_app, preflight

    settings = load_settings()
    preflight(settings, "serve")
    asyncio.run(_check_database(settings))
    proxies = forwarded_allow_ips(args.forwarded_allow_ips, os.environ)
    log.info("serving on http://%s:%d; X-Forwarded-For/-Proto trusted from %s", args.host, args.port, proxies or "none")
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips=proxies,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )
    return 0


def worker(args: argparse.Namespace) -> int:
    """Run the local dispatcher without the HTTP API until SIGTERM or SIGINT, then drain it and exit."""
    settings = load_settings()
    check_startup(settings, "worker")
    # uvloop when installed (uvicorn[standard] brings it), as `serve` runs under uvicorn.
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_run_worker(settings, metrics_host=args.metrics_host, metrics_port=args.metrics_port))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _run_worker(settings: Settings, *, metrics_host: str, metrics_port: int | None) -> None:
    from prometheus_client import start_http_server

    from notifier.app import running_worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await _check_database(settings)
        async with running_worker(settings) as worker:
            # The API's /metrics counts what the API does; attempts and provider latency happen here.
            exporter = None
            if metrics_port is not None:
                exporter, _ = start_http_server(metrics_port, addr=metrics_host, registry=worker.core.metrics.registry)
                log.info("worker metrics on http://%s:%d/metrics", metrics_host, metrics_port)
            try:
                await stop.wait()
                log.info("notifier worker stopping: finishing in-flight attempts, releasing the rest")
            finally:
                if exporter is not None:
                    exporter.shutdown()
                    exporter.server_close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("notifier worker stopped")


def migrate(args: argparse.Namespace) -> int:
    settings = load_settings()

    async def run() -> str | None:
        engine = db.create_engine(settings.database_url)
        try:
            await db.migrate(engine)
            return await db.current_revision(engine)
        finally:
            await engine.dispose()

    revision = asyncio.run(run())
    log.info("database is at revision %s", revision)
    return 0


def retention(args: argparse.Namespace) -> int:
    """Delete expired rows now (what the QStash retention cron does), until nothing old is left."""
    from notifier.db.retention import purge_expired
    from notifier.types import utcnow

    settings = load_settings()

    async def run() -> dict[str, object]:
        engine = db.create_engine(settings.database_url)
        cutoff = utcnow() - dt.timedelta(days=settings.retention_days)
        totals = {
            "events_deleted": 0,
            "deliveries_deleted": 0,
            "inbox_messages_deleted": 0,
            "preference_changes_deleted": 0,
        }
        try:
            sessions = db.create_session_factory(engine)
            while True:
                report = await purge_expired(sessions=sessions, cutoff=cutoff)
                totals["events_deleted"] += report.events
                totals["deliveries_deleted"] += report.deliveries
                totals["inbox_messages_deleted"] += report.inbox_messages
                totals["preference_changes_deleted"] += report.preference_changes
                if not report.more:
                    return {"cutoff": cutoff.isoformat(), **totals}
        finally:
            await engine.dispose()

    print(json.dumps(asyncio.run(run())))
    return 0


def schedules_sync(args: argparse.Namespace) -> int:
    import httpx
    from qstash.errors import QStashError

    from notifier.channels.edge import describe, redact
    from notifier.dispatch.qstash import sync_schedules

    settings = load_settings()
    check_startup(settings, "schedules")
    try:
        ids = asyncio.run(sync_schedules(settings))
    except (QStashError, httpx.HTTPError, TimeoutError, OSError) as exc:
        # QStash refusing (a wrong token, a bad destination) or not answering: the operator needs what failed, not
        # the SDK's and httpx's stack. The token never appears, whatever QStash's reply echoed.
        token = settings.qstash_token.get_secret_value() if settings.qstash_token is not None else ""
        reason = redact(describe(exc), [token]).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason += f" (no answer within NOTIFIER_PROVIDER_TIMEOUT_SECONDS={settings.provider_timeout_seconds:g})"
        log.error("cannot sync the QStash schedules at %s: %s", settings.qstash_url, reason)
        return 1
    print(json.dumps({"schedules": ids}))
    return 0


def send_test(args: argparse.Namespace) -> int:
    from notifier.testsend import send_test_notification

    result = asyncio.run(send_test_notification(load_settings(), user_id=args.user, channel=args.channel))
    print(json.dumps(result, indent=2))
    return 0 if result.get("status") == "sent" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notifier", description="Notification routing microservice.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP service (configuration from the environment)")
    serve_cmd.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: every interface)"
    )
    serve_cmd.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    serve_cmd.add_argument(
        "--forwarded-allow-ips",
        default=None,
        help="comma-separated addresses or networks of the reverse proxies whose X-Forwarded-For/-Proto are trusted "
        "(default: $FORWARDED_ALLOW_IPS, else 127.0.0.1; never '*' on a port clients reach directly)",
    )
    serve_cmd.set_defaults(handler=serve)
    worker_cmd = commands.add_parser(
        "worker",
        help="run only the local dispatcher, no HTTP API (beside `serve` with NOTIFIER_EMBEDDED_DISPATCHER=false)",
    )
    worker_cmd.add_argument(
        "--metrics-port",
        type=int,
        help="serve this worker's Prometheus metrics at http://HOST:PORT/metrics (default: no metrics endpoint)",
    )
    worker_cmd.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: %(default)s)"
    )
    worker_cmd.set_defaults(handler=worker)
    commands.add_parser("migrate", help="upgrade the database to the latest schema").set_defaults(handler=migrate)
    commands.add_parser(
        "retention",
        help="delete events, deliveries, read inbox items and superseded preference history older than "
        "NOTIFIER_RETENTION_DAYS",
    ).set_defaults(handler=retention)
    schedules = commands.add_parser("schedules", help="QStash cron schedules")
    schedules_commands = schedules.add_subparsers(dest="schedules_command", required=True)
    schedules_commands.add_parser("sync", help="create or update the cron schedules").set_defaults(
        handler=schedules_sync
    )
    send = commands.add_parser("send-test", help="send one test notification to a user on a channel")
    send.add_argument("--user", required=True, help="the user id to send to")
    send.add_argument("--channel", required=True, choices=["push", "email", "in_app"], help="the channel to send on")
    send.set_defaults(handler=send_test)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(_log_level())
    try:
        code: int = args.handler(args)
        return code
    except ConfigurationError as exc:
        log.error("%s", exc.detail)
        return 2


def _log_level() -> str:
    try:
        return Settings().log_level
    except ValidationError:
        return "INFO"


if __name__ == "__main__":
    sys.exit(main())
