"""QStashDispatcher (real ``qstash`` SDK) publishing to the QStash emulator: headers, batching, dedup, bounds."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from qstash import AsyncQStash, Receiver

from notifier.config import Settings
from notifier.dispatch import qstash as qstash_module
from notifier.dispatch.base import DispatchItem
from notifier.dispatch.qstash import QStashDispatcher, close_client, sync_schedules
from notifier.errors import ConfigurationError
from tests.dispatch.conftest import MAX_RETRIES, Destination, MakeDispatcher, api_calls, delivery_url, hung_server
from tests.fakes.base import Fault, refused_url
from tests.fakes.qstash import QStashEmulator


async def test_one_delivery_is_published_with_the_contract_headers(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    item = DispatchItem(uuid.uuid4())
    dispatcher = make_dispatcher()

    published = await dispatcher.dispatch([item])

    [call] = qstash_emulator.requests
    assert call.method == "POST"
    assert call.path == f"/v2/publish/{delivery_url(destination, item)}"
    assert call.headers["authorization"] == f"Bearer {qstash_emulator.token}"
    assert call.headers["upstash-deduplication-id"] == f"{item.delivery_id}.0"  # the delivery, generation 0
    assert call.headers["upstash-retries"] == str(MAX_RETRIES)
    assert call.headers["upstash-failure-callback"] == f"{destination.url}/v1/qstash/failures"
    assert call.headers["content-type"] == "application/json"
    assert "upstash-not-before" not in call.headers
    assert call.json() == {"delivery_id": str(item.delivery_id), "generation": 0}
    assert (dispatcher.published, published, dispatcher.failed) == (1, 1, 0)

    await qstash_emulator.drain()
    [received] = destination.received("deliveries")
    [message_id] = qstash_emulator.messages
    assert received.path == f"/v1/qstash/deliveries/{item.delivery_id}"
    assert received.json() == {"delivery_id": str(item.delivery_id), "generation": 0}
    assert received.headers["upstash-message-id"] == message_id
    assert received.headers["upstash-retried"] == "0"


async def test_three_deliveries_are_one_batch_request(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    items = [DispatchItem(uuid.uuid4()) for _ in range(3)]
    dispatcher = make_dispatcher()

    published = await dispatcher.dispatch(items)

    [call] = qstash_emulator.requests
    assert call.path == "/v2/batch"
    batch = call.json()
    assert [m["destination"] for m in batch] == [delivery_url(destination, i) for i in items]
    for message, item in zip(batch, items, strict=True):
        assert message["headers"]["Upstash-Deduplication-Id"] == f"{item.delivery_id}.0"
        assert message["headers"]["Upstash-Retries"] == str(MAX_RETRIES)
        assert message["headers"]["Upstash-Failure-Callback"] == f"{destination.url}/v1/qstash/failures"
        assert json.loads(message["body"]) == {"delivery_id": str(item.delivery_id), "generation": 0}
    assert published == 3

    await qstash_emulator.drain()
    assert sorted(r.path for r in destination.received("deliveries")) == sorted(
        f"/v1/qstash/deliveries/{i.delivery_id}" for i in items
    )


async def test_large_dispatches_are_chunked(
    qstash_emulator: QStashEmulator, make_dispatcher: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qstash_module, "BATCH_SIZE", 2)
    dispatcher = make_dispatcher()

    await dispatcher.dispatch([DispatchItem(uuid.uuid4()) for _ in range(5)])

    assert [len(r.json()) for r in api_calls(qstash_emulator, "/v2/batch")] == [2, 2, 1]
    assert dispatcher.published == 5
    await qstash_emulator.drain()


async def test_future_not_before_is_sent_and_honoured_past_one_is_not_sent(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    # 120 s -> 1.2 s: far enough from "at once" that a loaded machine's slow delivery cannot pass for a deferred one
    # (at 0.24 s, one under two other suites took 0.21 s).
    qstash_emulator.time_scale = 0.01
    now = dt.datetime.now(dt.UTC)
    later = DispatchItem(uuid.uuid4(), not_before=now + dt.timedelta(seconds=120))
    overdue = DispatchItem(uuid.uuid4(), not_before=now - dt.timedelta(seconds=30))
    published_at = time.monotonic()

    await make_dispatcher().dispatch([later, overdue])

    [call] = qstash_emulator.requests
    later_headers, overdue_headers = (m["headers"] for m in call.json())
    assert later_headers["Upstash-Not-Before"] == str(math.ceil(later.not_before.timestamp()))  # type: ignore[union-attr]
    assert "Upstash-Not-Before" not in overdue_headers
    await qstash_emulator.drain()
    by_url = {a.url: a for a in qstash_emulator.deliveries_log}
    assert by_url[delivery_url(destination, overdue)].at - published_at < 1.0
    assert by_url[delivery_url(destination, later)].at - published_at >= 1.1


async def test_the_same_delivery_dispatched_twice_is_delivered_once(
    qstash_emulator: QStashEmulator, destination: Destination, make_dispatcher: MakeDispatcher
) -> None:
    first, second = DispatchItem(uuid.uuid4()), DispatchItem(uuid.uuid4())
    dispatcher = make_dispatcher()

    await dispatcher.dispatch([first])
    await dispatcher.dispatch([first])
    await dispatcher.dispatch([first, second])  # the sweep re-publishing a batch

    assert len(qstash_emulator.requests) == 3
    assert (dispatcher.published, dispatcher.deduplicated) == (4, 2)
    await qstash_emulator.drain()
    assert sorted(r.path for r in destination.received("deliveries")) == sorted(
        [f"/v1/qstash/deliveries/{first.delivery_id}", f"/v1/qstash/deliveries/{second.delivery_id}"]
    )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == qstash_module.__name__ and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("size", [1, 3])
async def test_refused_qstash_is_logged_not_raised(
    size: int, make_dispatcher: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make_dispatcher(base_url=refused_url(), token="qs-secret-token-123")
    started = time.monotonic()

    await dispatcher.dispatch([DispatchItem(uuid.uuid4()) for _ in range(size)])

    assert time.monotonic() - started < 1.0  # no SDK retry loop
    assert (dispatcher.published, dispatcher.failed) == (0, size)
    [warning] = _warnings(caplog)
    assert "ConnectError" in warning
    assert f"0 of {size} published" in warning
    assert "qs-secret-token-123" not in warning


@pytest.mark.parametrize("size", [1, 3])
async def test_hung_qstash_returns_within_the_timeout(
    size: int, make_dispatcher: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    with hung_server() as url:
        dispatcher = make_dispatcher(base_url=url, timeout=0.5)
        started = time.monotonic()
        await dispatcher.dispatch([DispatchItem(uuid.uuid4()) for _ in range(size)])
        elapsed = time.monotonic() - started

    assert 0.4 < elapsed < 1.5  # the SDK default would wait 600 s, then retry 5 times
    assert (dispatcher.published, dispatcher.failed) == (0, size)
    [warning] = _warnings(caplog)
    assert "Timeout" in warning


async def test_qstash_http_errors_are_logged_without_the_token(
    qstash_emulator: QStashEmulator, make_dispatcher: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_token = "qs-wrong-token-456"
    await make_dispatcher(token=wrong_token).dispatch([DispatchItem(uuid.uuid4())])
    qstash_emulator.fail_next(Fault.http(500, {"error": f"boom {qstash_emulator.token}"}))
    dispatcher = make_dispatcher()
    await dispatcher.dispatch([DispatchItem(uuid.uuid4()) for _ in range(3)])

    unauthorized, server_error = _warnings(caplog)
    assert "status: 401" in unauthorized
    assert wrong_token not in unauthorized
    assert "status: 500" in server_error
    assert qstash_emulator.token not in server_error
    assert "[redacted]" in server_error
    assert (dispatcher.published, dispatcher.failed) == (0, 3)
    assert qstash_emulator.messages == {}


async def test_first_failed_chunk_stops_the_dispatch(
    qstash_emulator: QStashEmulator, make_dispatcher: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qstash_module, "BATCH_SIZE", 2)
    qstash_emulator.fail_next(Fault.http(503))
    dispatcher = make_dispatcher()

    await dispatcher.dispatch([DispatchItem(uuid.uuid4()) for _ in range(5)])

    assert len(qstash_emulator.requests) == 1
    assert (dispatcher.published, dispatcher.failed) == (0, 5)


async def test_sync_schedules_is_idempotent(qstash_emulator: QStashEmulator, destination: Destination) -> None:
    settings = Settings(qstash_url=qstash_emulator.url, qstash_token=qstash_emulator.token, public_url=destination.url)

    assert await sync_schedules(settings) == ["notifier-sweep", "notifier-retention"]
    assert await sync_schedules(settings) == ["notifier-sweep", "notifier-retention"]

    assert len(api_calls(qstash_emulator, "/v2/schedules/")) == 4
    client = AsyncQStash(qstash_emulator.token, retry=False, base_url=qstash_emulator.url)
    try:
        schedules = {s.schedule_id: s for s in await client.schedule.list()}
    finally:
        await close_client(client)
    assert sorted(schedules) == ["notifier-retention", "notifier-sweep"]
    assert schedules["notifier-sweep"].destination == f"{destination.url}/v1/qstash/cron/sweep"
    assert schedules["notifier-sweep"].cron == "* * * * *"
    assert schedules["notifier-retention"].destination == f"{destination.url}/v1/qstash/cron/retention"
    assert schedules["notifier-retention"].cron == "17 * * * *"

    await qstash_emulator.fire_schedule("notifier-sweep")
    await qstash_emulator.drain()
    [run] = destination.received("cron")
    assert run.path == "/v1/qstash/cron/sweep"
    assert run.headers["upstash-schedule-id"] == "notifier-sweep"
    Receiver(qstash_emulator.current_key, qstash_emulator.next_key).verify(
        signature=run.headers["upstash-signature"],
        body=run.body.decode(),
        url=f"{destination.url}/v1/qstash/cron/sweep",
    )


async def test_sync_schedules_fails_loudly(destination: Destination) -> None:
    with pytest.raises(ConfigurationError):
        await sync_schedules(Settings(public_url=destination.url))
    with pytest.raises(httpx.ConnectError):
        await sync_schedules(Settings(qstash_url=refused_url(), qstash_token="qs-token", public_url=destination.url))


async def test_from_settings_uses_the_configured_values() -> None:
    settings = Settings(
        qstash_url="http://127.0.0.1:1",
        qstash_token="qs-token",
        public_url="http://notifier.test/",
        max_retries=7,
        provider_timeout_seconds=1.5,
    )
    dispatcher = QStashDispatcher.from_settings(settings)
    assert dispatcher.name == "qstash"
    assert dispatcher.destination(DispatchItem(uuid.UUID(int=1))) == (
        "http://notifier.test/v1/qstash/deliveries/00000000-0000-0000-0000-000000000001"
    )
    assert dispatcher.failure_callback == "http://notifier.test/v1/qstash/failures"
    assert "qs-token" not in repr(dispatcher)
    await dispatcher.aclose()
    with pytest.raises(ConfigurationError):
        QStashDispatcher.from_settings(Settings())


async def test_make_client_bounds_the_sdk() -> None:
    # The private seam make_client reaches into; this fails loudly if an SDK upgrade moves it.
    client = qstash_module.make_client(token="qs-token", base_url="http://127.0.0.1:1", timeout=0.75)
    try:
        assert client.http._client.timeout == httpx.Timeout(0.75)
        assert client.http._retry["retries"] == 0
    finally:
        await close_client(client)


@contextlib.asynccontextmanager
async def closing_its_first_connection_when_reused(upstream: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback proxy to ``upstream`` whose first connection, once it has carried one answer, is dropped when
    the client sends its next request on it, before that request reaches ``upstream``: a server closing an idle
    keep-alive connection just as the client reuses it. Yields the proxy's URL and what each connection saw."""
    host, port = httpx.URL(upstream).host, httpx.URL(upstream).port
    seen: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answered: asyncio.Event) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            answered.set()

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        number = len(seen)
        seen.append("open")
        server_reader, server_writer = await asyncio.open_connection(host, port)
        answered = asyncio.Event()
        back = asyncio.create_task(pipe(server_reader, client_writer, answered))
        try:
            while data := await client_reader.read(65536):
                if number == 0 and answered.is_set():
                    seen[number] = "dropped on reuse"
                    break
                server_writer.write(data)
                await server_writer.drain()
        finally:
            back.cancel()
            for writer in (client_writer, server_writer):
                writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    finally:
        server.close()


@pytest.mark.parametrize("size", [1, 3])
async def test_a_publish_on_a_connection_qstash_closed_meanwhile_is_sent_again_on_a_new_one(
    size: int, qstash_emulator: QStashEmulator, make_dispatcher: MakeDispatcher
) -> None:
    async with closing_its_first_connection_when_reused(qstash_emulator.url) as (url, connections):
        dispatcher = make_dispatcher(base_url=url)
        first, then = (
            [DispatchItem(uuid.uuid4()) for _ in range(size)],
            [DispatchItem(uuid.uuid4()) for _ in range(size)],
        )
        assert await dispatcher.dispatch(first) == size
        assert await dispatcher.dispatch(then) == size  # not left for the sweep
    assert connections == ["dropped on reuse", "open"]
    assert (dispatcher.published, dispatcher.failed) == (2 * size, 0)
    published = [r for r in qstash_emulator.requests if r.path.startswith(("/v2/publish", "/v2/batch"))]
    assert len(published) == 2  # the dropped request never reached QStash; sent again, it did
