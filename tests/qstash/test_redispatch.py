"""Every deliberate re-dispatch reaches QStash, whose emulator deduplicates ``Upstash-Deduplication-Id`` for 600 s
as QStash does for 10 minutes: an operator's retry, the dashboard's, the sweep taking over a lease a killed
process left behind, a message QStash gave up on. A re-publish of the same intent keeps its generation and is
still dropped as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from notifier.dispatch.qstash import SWEEP_SCHEDULE_ID, QStashDispatcher, sync_schedules
from notifier.types import DispatchItem
from tests.conftest import SERVICE_KEY, make_settings
from tests.fakes.base import Fault, free_port
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.qstash import DeliveryAttempt as QStashCall
from tests.fakes.qstash import QStashEmulator
from tests.qstash.conftest import Stack, chat_event
from tests.qstash.test_process_crash import qstash_env
from tests.reliability.ledger import (
    Providers,
    all_terminal,
    assert_exactly_once,
    eventually,
    payment_event,
    read_record,
    unit_of,
)
from tests.reliability.test_process_crash import notifier_serve, wait_ready

AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}


def dedup_ids(emulator: QStashEmulator, fragment: str) -> list[str]:
    """The deduplication ids of the messages the emulator accepted for destinations containing ``fragment``."""
    return [
        m.headers.get("upstash-deduplication-id", "") for m in emulator.messages.values() if fragment in m.destination
    ]


async def failed_push(stack: Stack) -> uuid.UUID:
    """A chat push that OneSignal refused for good (400): failed, its fallback email planned."""
    stack.onesignal.fail_next(Fault.http(400, {"errors": ["Notification content must not be null"]}))
    await stack.publish_event(chat_event())
    await stack.emulator.drain()
    [push] = [d for d in await stack.deliveries() if d.channel == "push"]
    assert (push.status, push.reason, push.dispatch_generation) == ("failed", "rejected", 0)
    return push.id


@pytest.mark.parametrize("via", ["api", "dashboard"])
async def test_a_retried_failed_delivery_is_attempted_at_once_and_sent_once(stack: Stack, via: str) -> None:
    push_id = await failed_push(stack)

    started = time.monotonic()
    if via == "api":
        retried = await stack.http.post(stack.url(f"/v1/deliveries/{push_id}/retry"), headers=AUTH)
        assert retried.status_code == 202
    else:
        retried = await stack.http.post(stack.url(f"/dashboard/deliveries/{push_id}/retry"), headers=AUTH)
        assert retried.status_code == 303

    async def sent() -> bool:
        return (await stack.delivery_by_id(push_id)).status == "sent"

    await eventually(sent, timeout=2, what="the retried push to be sent")
    assert time.monotonic() - started < 2
    push = await stack.delivery_by_id(push_id)
    assert (push.attempts, push.dispatch_generation, push.send_group) == (2, 1, None)
    # Two messages, one per generation: the retry was not dropped as a duplicate of the first publish.
    assert dedup_ids(stack.emulator, f"/v1/qstash/deliveries/{push_id}") == [f"{push_id}.0", f"{push_id}.1"]
    # OneSignal refused the first attempt (nothing created) and created the retry's notification once.
    assert stack.notified() == ["user-1"]


async def test_a_republish_of_the_same_generation_is_still_deduplicated(stack: Stack) -> None:
    await stack.publish_event(chat_event())
    await stack.emulator.drain()
    [push] = [d for d in await stack.deliveries() if d.channel == "push"]
    dispatcher = QStashDispatcher.from_settings(stack.settings)
    try:
        same = DispatchItem(push.id, generation=push.dispatch_generation)
        assert await dispatcher.dispatch([same]) == 1
        assert dispatcher.deduplicated == 1  # accepted by QStash, not enqueued again
        await stack.emulator.drain()
        assert len(dedup_ids(stack.emulator, f"/v1/qstash/deliveries/{push.id}")) == 1
        newer = DispatchItem(push.id, generation=push.dispatch_generation + 1)
        assert await dispatcher.dispatch([newer]) == 1
        assert dispatcher.deduplicated == 1  # a new generation is a new message
        await stack.emulator.drain()
    finally:
        await dispatcher.aclose()
    calls = stack.calls(f"/v1/qstash/deliveries/{push.id}")
    assert [c.status for c in calls] == [200, 200]  # the newer message found the push sent: nothing resent
    assert stack.notified() == ["user-1"]


async def test_a_message_of_an_older_generation_changes_nothing(stack: Stack) -> None:
    push_id = await failed_push(stack)
    retried = await stack.http.post(stack.url(f"/v1/deliveries/{push_id}/retry"), headers=AUTH)
    assert retried.status_code == 202
    await stack.emulator.drain()
    # QStash redelivers the first message (generation 0) late, and then gives up on it.
    first_id = f"{push_id}.0"
    [first] = [m for m in stack.emulator.messages.values() if m.headers.get("upstash-deduplication-id") == first_id]
    late = await stack.emulator.redeliver(first.id)
    assert late.status == 200
    assert json.loads(late.response_body)["outcome"] == "superseded"
    push = await stack.delivery_by_id(push_id)
    assert (push.status, push.attempts) == ("sent", 2)


# --- a process killed while QStash is delivering: leases held, QStash giving up, the sweep taking over ---

LEASE = 6  # the dead process's claim lease (seconds)
TICK = 1.0  # the sweep's period in this test (every minute in production)
QSTASH_RETRIES = 3
PROVIDER_STALL = 4.0  # OneSignal creates the pushes at once, then sits on its replies


@contextlib.asynccontextmanager
async def sweeping(emulator: QStashEmulator, every: float) -> AsyncIterator[list[float]]:
    """Fire the sweep schedule every ``every`` seconds (the emulator's cron) while the block runs."""
    fired: list[float] = []

    async def tick() -> None:
        while True:
            await asyncio.sleep(every)
            fired.append(time.monotonic())
            await emulator.fire_schedule(SWEEP_SCHEDULE_ID)

    task = asyncio.create_task(tick())
    try:
        yield fired
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.postgres_only
async def test_after_a_sigkill_every_delivery_ends_within_the_lease_and_two_sweep_ticks(
    postgres_url: str, qstash_emulator: QStashEmulator, onesignal_fake: OneSignalFake, tmp_path: Path
) -> None:
    emulator = qstash_emulator
    # Real seconds, retries 0.3 s apart: QStash spends its 3 retries on 503s while the dead attempts' leases
    # are held, and gives up long before they end.
    emulator.time_scale, emulator.max_wait = 1.0, 0.3
    # QStash spreads a failure callback's 12 retries over days; here they must outlast the restart below on a loaded
    # machine. Capped at 0.3 s they lasted ~4 s: a restart 4.5 s after the kill lost the callbacks of rows the dead
    # process never claimed, which then waited for the sweep's 30 s grace.
    emulator.callback_max_wait = 1.0
    providers = Providers(onesignal=onesignal_fake)
    port, log = free_port(), tmp_path / "notifier.log"
    url = f"http://127.0.0.1:{port}"
    env = qstash_env(postgres_url, providers, emulator, url, LEASE) | {"NOTIFIER_MAX_RETRIES": str(QSTASH_RETRIES)}
    bodies = [payment_event(f"kill-{n}", f"u-{n}-a", f"u-{n}-b", f"u-{n}-c") for n in range(6)]

    onesignal_fake.latency = PROVIDER_STALL
    with notifier_serve(env, port, log) as first:
        await wait_ready(url, first, log)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            for body in bodies:
                published = await http.post(
                    f"{emulator.url}/v2/publish/{url}/v1/events",
                    json=body,
                    headers={"Authorization": f"Bearer {emulator.token}"},
                )
                published.raise_for_status()
        # Kill only once every event was answered (its deliveries published before the answer): a kill between
        # an event's commit and its publish leaves rows QStash never got, which the sweep rightly takes up only
        # after SWEEP_GRACE (30 s) -- a different guarantee from the one this test times.
        accepted = f"{url}/v1/events"
        await eventually(
            lambda: (
                sum(c.status in (200, 202) for c in emulator.attempts(url=accepted)) >= len(bodies)
                and len(onesignal_fake.notifications) >= 2
            ),
            timeout=15,
            interval=0.01,
            what="every event accepted and pushes in flight",
        )
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
    onesignal_fake.latency = 0.0
    crashed = await read_record(postgres_url)
    held = [d for d in crashed.deliveries if d.status == "sending"]
    assert held, "no delivery was left sending under the dead process's lease: the test proved nothing"
    lease_end = max(d.claimed_until for d in held if d.claimed_until is not None)
    assert lease_end > dt.datetime.now(dt.UTC), "the restart came after the lease ended: raise LEASE"

    with notifier_serve(env, port, log) as second:
        await wait_ready(url, second, log)
        await sync_schedules(make_settings(postgres_url, **_qstash_settings(emulator, url)))
        async with sweeping(emulator, TICK):
            await eventually(
                lambda: all_terminal(postgres_url), timeout=LEASE + 10 * TICK + 15, what="every delivery to end"
            )
            ended = dt.datetime.now(dt.UTC)
        await emulator.drain(10)

    # QStash did give up while the leases were held; each failure callback ended answered 200 (those that came
    # while no process listened were retried by QStash), and the ones for held deliveries were noted, not acted on.
    assert emulator.failure_callbacks, "QStash never gave up: the test proved nothing"
    callbacks: dict[str, list[QStashCall]] = {}
    for call in emulator.attempts(url=f"{url}/v1/qstash/failures"):
        callbacks.setdefault(call.message_id, []).append(call)
    assert all(calls[-1].status == 200 for calls in callbacks.values()), callbacks
    answers = [json.loads(calls[-1].response_body) for calls in callbacks.values()]
    outcomes = {d["outcome"] for answer in answers for d in answer.get("deliveries", [answer])}
    assert "noted" in outcomes, outcomes
    # Every delivery ended within the lease and two sweep ticks (plus a machine's slack), not QStash's
    # 10-minute deduplication window: the takeover went out as a new generation.
    assert ended <= lease_end + dt.timedelta(seconds=2 * TICK + 3), (ended, lease_end)
    record = await read_record(postgres_url)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))
    taken_over = [record.by_id[d.id] for d in held]
    assert all(d.dispatch_generation >= 1 for d in taken_over)  # a new generation reached QStash
    assert len({unit_of(d) for d in record.of("push")}) == len(bodies)  # one notification per event's group


def _qstash_settings(emulator: QStashEmulator, url: str) -> dict[str, object]:
    return {
        "dispatcher": "qstash",
        "public_url": url,
        "qstash_token": emulator.token,
        "qstash_url": emulator.url,
        "qstash_current_signing_key": emulator.current_key,
        "qstash_next_signing_key": emulator.next_key,
    }
