"""The service killed with SIGKILL while deliveries are in flight, then started again.

``notifier serve`` runs as a real process on PostgreSQL with the OneSignal fake slow to answer, so
when the process dies some notifications have been created at the provider but not recorded as
sent. The restarted service takes the abandoned claims over once their lease runs out and retries
them with the same idempotency key: OneSignal answers from its key store and nothing is sent twice.
Events the producer could not get accepted while the service was down are retried with their keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SERVICE_KEY
from tests.fakes.base import free_port
from tests.fakes.onesignal import OneSignalFake
from tests.reliability.ledger import (
    Providers,
    all_terminal,
    assert_exactly_once,
    check_events,
    eventually,
    onesignal_key,
    payment_event,
    post_until_answered,
    read_record,
    requests_per_key,
)

NOTIFIER = [sys.executable, "-m", "notifier.cli"]
pytestmark = pytest.mark.postgres_only


def service_env(database_url: str, providers: Providers, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NOTIFIER_", "QSTASH_", "ONESIGNAL_", "KNOCK_", "SMTP_", "ABLY_", "DATABASE_URL"))
    }
    env |= providers.env() | {
        "DATABASE_URL": database_url,
        "NOTIFIER_API_KEYS": SERVICE_KEY,
        "NOTIFIER_WORKERS": "4",
        "NOTIFIER_POLL_INTERVAL_SECONDS": "0.05",
        "NOTIFIER_RETRY_BACKOFF_SCALE": "0.0002",
        "NOTIFIER_PROVIDER_TIMEOUT_SECONDS": "5",
        "NOTIFIER_LOG_LEVEL": "WARNING",
    }
    return env | extra


@contextlib.contextmanager
def notifier_serve(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``notifier serve`` on ``port``; kill it on exit if it is still running."""
    with log.open("ab") as out:
        process = subprocess.Popen([*NOTIFIER, "serve", "--port", str(port)], env=env, stdout=out, stderr=out)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:

        async def ready() -> bool:
            assert process.poll() is None, f"notifier exited with {process.returncode}:\n{log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                return (await client.get(f"{url}/readyz", timeout=2)).status_code == 200
            return False

        await eventually(ready, timeout=30, what="notifier to be ready")


async def test_sigkill_with_deliveries_in_flight_loses_and_doubles_nothing(
    scratch_postgres: str, onesignal_fake: OneSignalFake, tmp_path: Path
) -> None:
    providers = Providers(onesignal=onesignal_fake)
    migrated = subprocess.run(
        [*NOTIFIER, "migrate"], env=service_env(scratch_postgres, providers), capture_output=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr.decode()
    port, log = free_port(), tmp_path / "notifier.log"
    url = f"http://127.0.0.1:{port}"
    bodies = [payment_event(f"crash-{i}", f"u-{i}") for i in range(10)]
    onesignal_fake.latency = 1.5  # the provider acts at once but answers late: replies are in flight at the kill
    answers: list[httpx.Response] = []

    async def producer() -> None:
        deadline = time.monotonic() + 90
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            for body in bodies:
                answers.append(await post_until_answered(client, "/v1/events", body, deadline=deadline))
                await asyncio.sleep(0.05)

    first_env = service_env(scratch_postgres, providers, NOTIFIER_CLAIM_LEASE_SECONDS="2")
    second_env = service_env(scratch_postgres, providers, NOTIFIER_CLAIM_LEASE_SECONDS="1")
    producing: asyncio.Future[None] | None = None
    try:
        with notifier_serve(first_env, port, log) as first:
            await wait_ready(url, first, log)
            producing = asyncio.ensure_future(producer())
            await eventually(lambda: onesignal_fake.in_flight >= 2, timeout=30, what="pushes in flight at the provider")
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
        crashed = await read_record(scratch_postgres)
        abandoned = [d for d in crashed.of("push") if d.status == "sending"]
        created = {str(n.body["idempotency_key"]) for n in onesignal_fake.notifications}
        # the provider created these notifications, but the dead process never recorded them as sent
        in_limbo = [d for d in abandoned if onesignal_key(d.id) in created]
        assert in_limbo, "no delivery was caught between the provider's accept and our commit"
        onesignal_fake.latency = 0.0
        with notifier_serve(second_env, port, log) as second:
            await wait_ready(url, second, log)
            await asyncio.wait_for(producing, 90)
            await eventually(
                lambda: all_terminal(scratch_postgres),
                timeout=60,
                what="every delivery to finish after the restart",
            )
    finally:
        if producing is not None and not producing.done():
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
    assert {r.status_code for r in answers} <= {200, 202}
    record = await read_record(scratch_postgres)
    check_events(record, bodies)
    assert_exactly_once(record, providers, sent_channels=("push", "in_app"))
    requested = requests_per_key(onesignal_fake)
    for delivery in in_limbo:
        outcomes = [a.outcome for a in record.attempts_of(delivery.id)]
        assert outcomes == ["interrupted", "sent"], outcomes
        assert requested[onesignal_key(delivery.id)] == 2  # asked twice, created once
