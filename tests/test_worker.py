"""Separate worker processes: the API (embedded dispatcher off) wakes `notifier worker` over PostgreSQL NOTIFY.

Every test here sets a 30 s poll interval on both sides, so a delivery sent within seconds of its
event can only have been claimed because a NOTIFY woke the worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from notifier.app import running_worker
from notifier.config import Settings, load_settings
from notifier.dispatch.base import DispatchItem
from notifier.dispatch.notify import NotifyDispatcher, decode_payload, encode_payloads
from notifier.errors import ConfigurationError
from notifier.types import utcnow
from tests.conftest import Service, booking_event, make_settings, running_service
from tests.db_faults import dsn_of
from tests.fakes.base import free_port

SLOW_POLL = 30.0
PROMPT = 10.0  # generous for a loaded machine, and still a third of the poll interval


def api_settings(url: str, **overrides: Any) -> Settings:
    return make_settings(url, embedded_dispatcher=False, poll_interval_seconds=SLOW_POLL, **overrides)


def worker_settings(url: str, **overrides: Any) -> Settings:
    return make_settings(url, poll_interval_seconds=SLOW_POLL, **overrides)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def in_app_status(api: Service, event_id: str) -> str:
    event = (await api.get(f"/v1/events/{event_id}")).json()
    [in_app] = [d for d in event["deliveries"] if d["channel"] == "in_app"]
    return str(in_app["status"])


async def post_and_wait_sent(api: Service, user_id: str) -> None:
    response = await api.post_event(booking_event(recipients=[user_id]))
    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]

    async def sent() -> bool:
        return await in_app_status(api, event_id) == "sent"

    await eventually(sent, timeout=PROMPT, what=f"{user_id}'s in-app delivery to be sent by the worker")


async def terminate_backends(url: str, application_name: str) -> list[int]:
    """``pg_terminate_backend`` every connection of this database named ``application_name``; return their pids."""
    conn = await asyncpg.connect(dsn_of(url))
    try:
        rows = await conn.fetch(
            "SELECT pid, pg_terminate_backend(pid) AS done FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1",
            application_name,
        )
    finally:
        await conn.close()
    assert all(row["done"] for row in rows)
    return [row["pid"] for row in rows]


async def test_the_api_wakes_a_separate_worker_which_sends_without_waiting_for_its_poll(postgres_url: str) -> None:
    async with running_service(api_settings(postgres_url)) as api, running_worker(worker_settings(postgres_url)) as w:
        assert isinstance(api.runtime.dispatcher, NotifyDispatcher)  # the API attempts nothing itself
        assert (await api.client.get("/readyz")).json()["dispatcher"] == "local"
        assert w.listener.listening.is_set()
        # The second event comes long after the worker's first claim at start-up, which cannot explain it.
        for user_id in ("user-1", "user-2"):
            await post_and_wait_sent(api, user_id)
        assert w.listener.woken >= 2
        inbox = (await api.get("/v1/users/user-2/inbox")).json()
        assert inbox["data"][0]["title"] == "Booking confirmed: Seaview 4"
        dispatcher = api.runtime.dispatcher
        assert isinstance(dispatcher, NotifyDispatcher)
        assert dispatcher.notified >= 2
        assert dispatcher.failed == 0


async def test_two_workers_share_the_deliveries_and_attempt_each_once(postgres_url: str) -> None:
    async with (
        running_service(api_settings(postgres_url)) as api,
        running_worker(worker_settings(postgres_url)) as first,
        running_worker(worker_settings(postgres_url)) as second,
    ):
        responses = await asyncio.gather(*(api.post_event(booking_event(recipients=[f"u-{i}"])) for i in range(20)))
        assert all(r.status_code == 202 for r in responses)
        ids = [r.json()["event_id"] for r in responses]

        async def all_sent() -> bool:
            return all([await in_app_status(api, event_id) == "sent" for event_id in ids])

        await eventually(all_sent, timeout=PROMPT, what="every in-app delivery to be sent")
        assert first.listener.woken >= 1
        assert second.listener.woken >= 1
        for event_id in ids:
            detail = (await api.get(f"/v1/events/{event_id}")).json()
            [in_app] = [d for d in detail["deliveries"] if d["channel"] == "in_app"]
            attempts = (await api.get(f"/v1/deliveries/{in_app['id']}")).json()["attempts"]
            assert len(attempts) == 1


async def test_the_listener_reconnects_after_its_connection_is_terminated(postgres_url: str) -> None:
    async with running_service(api_settings(postgres_url)) as api, running_worker(worker_settings(postgres_url)) as w:
        listener = w.listener
        first_pid = listener.server_pid
        assert await terminate_backends(postgres_url, "notifier-listen") == [first_pid]

        async def listening_again() -> bool:
            return listener.connections == 2 and listener.listening.is_set()

        await eventually(listening_again, timeout=PROMPT, what="the listener to reconnect")
        assert listener.server_pid != first_pid
        await post_and_wait_sent(api, "user-after-reconnect")


async def test_the_api_notifies_again_after_its_connection_is_terminated(postgres_url: str) -> None:
    async with running_service(api_settings(postgres_url)) as api, running_worker(worker_settings(postgres_url)):
        await post_and_wait_sent(api, "user-before")
        assert len(await terminate_backends(postgres_url, "notifier-notify")) == 1
        await post_and_wait_sent(api, "user-after")
        dispatcher = api.runtime.dispatcher
        assert isinstance(dispatcher, NotifyDispatcher)
        assert dispatcher.failed == 0  # the stale connection was replaced within the same dispatch


async def test_notify_trouble_never_raises_and_leaves_the_rows_to_the_poll() -> None:
    port = free_port()  # nothing listens here

    async def unreachable() -> Any:
        return await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="x", timeout=2)

    dispatcher = NotifyDispatcher(connect=unreachable)
    await dispatcher.start()
    await dispatcher.dispatch([DispatchItem(uuid.uuid4()), DispatchItem(uuid.uuid4())])
    await dispatcher.dispatch([DispatchItem(uuid.uuid4())])  # inside the quiet period: not even tried
    assert (dispatcher.notified, dispatcher.failed) == (0, 3)
    await dispatcher.aclose()


async def test_deferred_items_are_not_announced(postgres_url: str) -> None:
    async with running_service(api_settings(postgres_url)) as api:
        dispatcher = api.runtime.dispatcher
        assert isinstance(dispatcher, NotifyDispatcher)
        later = utcnow().replace(year=utcnow().year + 1)
        await dispatcher.dispatch([DispatchItem(uuid.uuid4(), later)])
        assert (dispatcher.notified, dispatcher.failed) == (0, 0)
        await dispatcher.dispatch([DispatchItem(uuid.uuid4(), later), DispatchItem(uuid.uuid4())])
        assert (dispatcher.notified, dispatcher.failed) == (1, 0)


def test_payloads_stay_under_the_postgres_limit_and_round_trip() -> None:
    ids = [uuid.uuid4() for _ in range(1000)]
    payloads = encode_payloads(ids)
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert [item.delivery_id for p in payloads for item in decode_payload(p)] == ids
    assert decode_payload("") == []
    assert decode_payload("not-an-id") == []


async def test_a_worker_refuses_sqlite(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="needs PostgreSQL"):
        async with running_worker(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'n.db'}")):
            pass


async def test_a_worker_refuses_qstash_mode(postgres_url: str) -> None:
    settings = make_settings(postgres_url, dispatcher="qstash", qstash_token="qstash-token-0123456789")
    with pytest.raises(ConfigurationError, match="qstash"):
        async with running_worker(settings):
            pass


def test_sqlite_refuses_the_embedded_dispatcher_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'n.db'}")
    monkeypatch.setenv("NOTIFIER_EMBEDDED_DISPATCHER", "false")
    with pytest.raises(ConfigurationError, match="NOTIFIER_EMBEDDED_DISPATCHER=false needs PostgreSQL"):
        load_settings()
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://db/notifier")
    assert load_settings().embedded_dispatcher is False
