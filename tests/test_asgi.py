"""notifier.asgi, the serverless entry point: built from the environment on first access, QStash mode only,
and nothing notifier starts outlives a request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import notifier
from notifier import asgi
from notifier.app import create_app
from notifier.errors import ConfigurationError
from tests.conftest import SERVICE_KEY, booking_event, make_settings
from tests.fakes.base import refused_url
from tests.fakes.qstash import QStashEmulator

PACKAGE = Path(notifier.__file__).parent


def pending_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if not task.done()}


def started_by_notifier(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and Path(code.co_filename).is_relative_to(PACKAGE)


@pytest.fixture
def serverless_env(
    monkeypatch: pytest.MonkeyPatch, database_url: str, qstash_emulator: QStashEmulator
) -> Iterator[str]:
    """The environment of a serverless deployment; yields its public URL (where nothing listens)."""
    public_url = refused_url()
    environment = {
        "DATABASE_URL": database_url,
        "NOTIFIER_API_KEYS": SERVICE_KEY,
        "NOTIFIER_PUBLIC_URL": public_url,
        "NOTIFIER_MAX_RETRIES": "0",
        "QSTASH_TOKEN": qstash_emulator.token,
        "QSTASH_URL": qstash_emulator.url,
        "QSTASH_CURRENT_SIGNING_KEY": qstash_emulator.current_key,
        "QSTASH_NEXT_SIGNING_KEY": qstash_emulator.next_key,
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NOTIFIER_DISPATCHER", raising=False)  # QStash mode because QSTASH_TOKEN is set
    vars(asgi).pop("app", None)
    yield public_url
    vars(asgi).pop("app", None)


async def test_a_request_leaves_no_task_behind_in_qstash_mode(
    serverless_env: str, qstash_emulator: QStashEmulator
) -> None:
    app = asgi.app
    assert isinstance(app, Starlette)
    assert asgi.app is app  # built once, then a plain module attribute

    async with app.router.lifespan_context(app):
        assert [t for t in pending_tasks() if started_by_notifier(t)] == []  # the QStash dispatcher starts nothing
        assert app.state.runtime.dispatcher.name == "qstash"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serverless.invalid") as client:

            async def signed(path: str, body: bytes) -> httpx.Response:
                before = pending_tasks()
                signature = qstash_emulator.sign(body, f"{serverless_env}{path}")
                headers = {"Upstash-Signature": signature, "Content-Type": "application/json"}
                response = await client.post(path, content=body, headers=headers)
                assert pending_tasks() - before == set(), f"{path} left tasks running"
                return response

            accepted = await signed("/v1/events", json.dumps(booking_event()).encode())
            [in_app] = [d for d in accepted.json()["deliveries"] if d["channel"] == "in_app"]
            # published inside the request, not after it: QStash already holds the message
            published = [m.destination for m in qstash_emulator.messages.values() if not m.is_failure_callback]
            attempted = await signed(f"/v1/qstash/deliveries/{in_app['id']}", b"{}")
            swept = await signed("/v1/qstash/cron/sweep", b"{}")
            purged = await signed("/v1/qstash/cron/retention", b"{}")

    assert accepted.status_code == 202
    assert (attempted.status_code, attempted.json()["outcome"]) == (200, "sent")
    assert (swept.status_code, swept.json()["found"]) == (200, 0)
    assert (purged.status_code, purged.json()["events_deleted"]) == (200, 0)
    assert published == [f"{serverless_env}/v1/qstash/deliveries/{in_app['id']}"]


async def test_the_task_check_sees_the_local_dispatchers_workers(database_url: str) -> None:
    # The control for the test above: in local mode notifier does run background tasks, and they are seen.
    app = create_app(make_settings(database_url, dispatcher="local", workers=2))
    async with app.router.lifespan_context(app):
        names = sorted(t.get_name() for t in pending_tasks() if started_by_notifier(t))
    assert names == ["notifier-feeder", "notifier-worker-0", "notifier-worker-1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dispatcher": "local"}, "needs QStash mode"),
        ({"dispatcher": "qstash", "qstash_token": "t", "qstash_next_signing_key": None}, "QSTASH_NEXT_SIGNING_KEY"),
        (  # refused when the app is built, not from inside the runtime's lifespan
            {"qstash_token": "t", "qstash_next_signing_key": "sig_n" * 8, "catalog_path": "/nonexistent.toml"},
            "NOTIFIER_CATALOG_PATH: cannot read catalog /nonexistent.toml",
        ),
    ],
)
def test_the_entry_point_refuses_a_configuration_that_cannot_work_serverless(
    database_url: str, overrides: dict[str, Any], message: str
) -> None:
    settings = make_settings(database_url, qstash_current_signing_key="sig_c" * 8, **overrides)
    with pytest.raises(ConfigurationError, match=message):
        asgi.build_app(settings)


def test_the_entry_point_reports_a_bad_environment_as_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, serverless_env: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://nope")
    with pytest.raises(ConfigurationError, match="DATABASE_URL must start with"):
        _ = asgi.app
    with pytest.raises(AttributeError, match="no attribute 'application'"):
        _ = asgi.application  # module __getattr__: mypy sees a Starlette, the module has none
