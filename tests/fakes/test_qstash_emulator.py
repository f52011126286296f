"""The QStash emulator itself: the parts the dispatcher tests do not reach."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from qstash import AsyncQStash, Receiver
from qstash.errors import SignatureError
from qstash.message import PublishResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from notifier.dispatch.qstash import close_client
from tests.fakes.base import FakeProvider, Fault, refused_url, serve
from tests.fakes.qstash import QStashEmulator, parse_duration


class Recorder(FakeProvider):
    def __init__(self) -> None:
        super().__init__()
        self.url = ""
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT"])])

    async def _handle(self, request: Request) -> Response:
        await self.record(request)
        return await self.scripted_fault() or JSONResponse({"ok": True})


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    app = Recorder()
    with serve(app.app) as served:
        app.url = served.url
        yield app


@pytest.fixture
async def client(qstash_emulator: QStashEmulator) -> AsyncIterator[AsyncQStash]:
    sdk = AsyncQStash(qstash_emulator.token, retry=False, base_url=qstash_emulator.url)
    yield sdk
    await close_client(sdk)


async def publish(client: AsyncQStash, **options: Any) -> PublishResponse:
    response = await client.message.publish_json(**options)
    assert isinstance(response, PublishResponse)
    return response


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("1d10h30m", 86400 + 36000 + 1800), ("6m5s", 365.0), ("250ms", 0.25), ("soon", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


async def test_the_api_wants_the_token(qstash_emulator: QStashEmulator, recorder: Recorder) -> None:
    url = f"{qstash_emulator.url}/v2/publish/{recorder.url}/hook"
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(url, headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await http.post(url)).status_code == 401
        accepted = await http.post(url, params={"qstash_token": qstash_emulator.token}, content=b"hi")
    assert accepted.status_code == 201
    assert accepted.json()["messageId"] in qstash_emulator.messages
    await qstash_emulator.drain()
    assert [r.body for r in recorder.requests] == [b"hi"]


async def test_forwarded_headers_method_and_delay(
    qstash_emulator: QStashEmulator, recorder: Recorder, client: AsyncQStash
) -> None:
    qstash_emulator.time_scale = 0.005  # 60 s -> 0.3 s
    started = time.monotonic()
    await client.message.publish(
        url=f"{recorder.url}/hook", body="x", headers={"X-Tenant": "t1"}, method="PUT", delay=60
    )
    await qstash_emulator.drain()

    [received] = recorder.requests
    assert (received.method, received.headers["x-tenant"], received.headers["user-agent"]) == (
        "PUT",
        "t1",
        "Upstash-QStash",
    )
    assert qstash_emulator.deliveries_log[0].at - started >= 0.28


async def test_sign_helper_forges_what_the_receiver_must_refuse(qstash_emulator: QStashEmulator) -> None:
    receiver = Receiver(qstash_emulator.current_key, qstash_emulator.next_key)
    url, body = "http://127.0.0.1:9/v1/qstash/deliveries/1", '{"delivery_id": "1"}'
    receiver.verify(signature=qstash_emulator.sign(body, url), body=body, url=url)
    receiver.verify(signature=qstash_emulator.sign(body, url, key=qstash_emulator.next_key), body=body, url=url)
    forgeries = [
        qstash_emulator.sign(body, url, key="sig_someone_else_" + "z" * 32),
        qstash_emulator.sign(body, url, exp_delta=-5),
        qstash_emulator.sign(body, url, nbf_delta=60),
        qstash_emulator.sign(body, url, iss="NotUpstash"),
        qstash_emulator.sign(body, url, iss=None),
        qstash_emulator.sign(body, "http://127.0.0.1:9/elsewhere"),
        qstash_emulator.sign(body + " ", url),
    ]
    for forged in forgeries:
        with pytest.raises(SignatureError):
            receiver.verify(signature=forged, body=body, url=url)


async def test_rotated_keys_still_verify_with_the_fallback(qstash_emulator: QStashEmulator) -> None:
    old_current, old_next = qstash_emulator.current_key, qstash_emulator.next_key
    qstash_emulator.rotate_keys()
    assert qstash_emulator.current_key == old_next
    signature = qstash_emulator.sign("b", "http://h/x")
    Receiver(old_current, old_next).verify(signature=signature, body="b", url="http://h/x")


async def test_redeliver_and_concurrent_deliveries_reuse_the_message_id(
    qstash_emulator: QStashEmulator, recorder: Recorder, client: AsyncQStash
) -> None:
    published = await publish(client, url=f"{recorder.url}/hook", body={"n": 1})
    await qstash_emulator.drain()

    again = await qstash_emulator.redeliver(published.message_id)
    burst = await qstash_emulator.deliver_concurrently(published.message_id, 3)

    assert again.status == 200
    assert [a.status for a in burst] == [200, 200, 200]
    assert len(recorder.requests) == 5
    assert {r.headers["upstash-message-id"] for r in recorder.requests} == {published.message_id}
    assert len(qstash_emulator.attempts(message_id=published.message_id)) == 5


async def test_refused_and_timed_out_attempts_are_retried(
    qstash_emulator: QStashEmulator, recorder: Recorder, client: AsyncQStash
) -> None:
    qstash_emulator.attempt_timeout = 0.2
    recorder.fail_next(Fault.hang(1.0))
    await publish(client, url=f"{recorder.url}/hook", body={}, retries=1)
    refused = await publish(client, url=f"{refused_url()}/hook", body={}, retries=1)
    await qstash_emulator.drain()

    slow = [a for a in qstash_emulator.deliveries_log if a.url.startswith(recorder.url)]
    assert [(a.status, a.retried) for a in slow] == [(None, 0), (200, 1)]
    assert "Timeout" in (slow[0].error or "")
    dead = qstash_emulator.attempts(message_id=refused.message_id)
    assert [(a.status, a.retried) for a in dead] == [(None, 0), (None, 1)]
    assert qstash_emulator.messages[refused.message_id].state == "FAILED"
    assert [d["messageId"] for d in qstash_emulator.dlq] == [refused.message_id]
    assert qstash_emulator.failure_callbacks == []  # none was asked for


async def test_dedup_window_and_content_based_dedup(
    qstash_emulator: QStashEmulator, recorder: Recorder, client: AsyncQStash
) -> None:
    url = f"{recorder.url}/hook"
    first = await publish(client, url=url, body={"a": 1}, content_based_deduplication=True)
    same = await publish(client, url=url, body={"a": 1}, content_based_deduplication=True)
    other = await publish(client, url=url, body={"a": 2}, content_based_deduplication=True)
    assert (same.message_id, same.deduplicated, other.deduplicated) == (first.message_id, True, False)

    qstash_emulator.dedup_window = 0.1
    await publish(client, url=url, body={}, deduplication_id="d-1")
    await asyncio.sleep(0.15)
    late = await publish(client, url=url, body={}, deduplication_id="d-1")
    assert not late.deduplicated
    await qstash_emulator.drain()
    assert len(recorder.requests) == 4


async def test_schedules_upsert_get_and_delete(qstash_emulator: QStashEmulator, client: AsyncQStash) -> None:
    await client.schedule.create(destination="http://127.0.0.1:9/a", cron="* * * * *", schedule_id="s-1")
    await client.schedule.create(destination="http://127.0.0.1:9/b", cron="0 * * * *", schedule_id="s-1")
    generated = await client.schedule.create(destination="http://127.0.0.1:9/c", cron="0 0 * * *")

    fetched = await client.schedule.get("s-1")
    assert (fetched.destination, fetched.cron) == ("http://127.0.0.1:9/b", "0 * * * *")
    assert generated.startswith("scd_")
    await client.schedule.delete("s-1")
    assert [s.schedule_id for s in await client.schedule.list()] == [generated]
