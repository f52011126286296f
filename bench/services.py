"""The processes under test and around them: fake providers, QStash emulator, notifier, raw baseline.

Each runs in its own process (its own GIL) on a loopback port; ``Stack`` owns them and stops them.
"""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import database, procs

API_KEY = f"bench-key-{secrets.token_hex(12)}"
ONESIGNAL_APP_ID = str(uuid.uuid4())
ONESIGNAL_KEY = f"os_v2_app_{secrets.token_hex(12)}"
KNOCK_KEY = f"sk_test_{secrets.token_hex(12)}"
ABLY_KEY = f"bench.key:{secrets.token_hex(16)}"
QSTASH_TOKEN = f"qstash_bench_{secrets.token_hex(8)}"


@dataclass
class Providers:
    child: procs.Child
    http_url: str
    https_url: str
    cert: Path

    def reset(self) -> None:
        httpx.post(f"{self.http_url}/__bench/reset", timeout=10).raise_for_status()

    def stats(self) -> dict[str, Any]:
        """Requests since the last reset: ``calls`` (those carrying deliveries), ``calls_by_kind``, ``replays``."""
        reply = httpx.get(f"{self.http_url}/__bench/stats", timeout=10)
        reply.raise_for_status()
        return dict(reply.json())

    def receipts(self) -> dict[str, int]:
        """The first receipt time (ns) of every idempotency key since the last reset."""
        reply = httpx.get(f"{self.http_url}/__bench/receipts", timeout=60)
        reply.raise_for_status()
        return dict(reply.json())

    def members(self) -> dict[str, list[str]]:
        """The recipients named by each call (by key) that named more than one, since the last reset."""
        reply = httpx.get(f"{self.http_url}/__bench/members", timeout=60)
        reply.raise_for_status()
        return dict(reply.json())

    def set_presence(self, present: dict[str, list[str]]) -> None:
        """Make these client ids present on these Ably channels (merged with earlier ones, kept across resets)."""
        httpx.post(f"{self.http_url}/__bench/presence", json=present, timeout=30).raise_for_status()


@dataclass
class Stack:
    """Every child process of one bench run; ``close`` stops them in reverse order."""

    logs: Path
    children: list[procs.Child] = field(default_factory=list)

    def add(self, child: procs.Child) -> procs.Child:
        self.children.append(child)
        return child

    def remove(self, child: procs.Child) -> None:
        procs.stop(child)
        self.children.remove(child)

    def close(self) -> None:
        for child in reversed(self.children):
            procs.stop(child)
        self.children.clear()


@contextlib.contextmanager
def stack(logs: Path) -> Iterator[Stack]:
    running = Stack(logs)
    try:
        yield running
    finally:
        running.close()


def start_providers(running: Stack, workdir: Path) -> Providers:
    from tests.fakes.base import make_self_signed_cert

    cert, key = make_self_signed_cert(workdir)
    http_port, https_port = procs.free_port(), procs.free_port()
    args = ["-m", "bench.providers", "--http-port", str(http_port), "--https-port", str(https_port)]
    args += ["--cert", str(cert), "--key", str(key)]
    child = running.add(procs.start("providers", args, port=http_port, env={}, logs=running.logs))
    procs.wait_for_port(https_port, child.proc, log=child.log)
    return Providers(child, f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}", cert)


def start_qstash(running: Stack, *, concurrency: int) -> procs.Child:
    port = procs.free_port()
    args = ["-m", "bench.qstash_runner", "--port", str(port), "--token", QSTASH_TOKEN]
    args += ["--concurrency", str(concurrency)]
    return running.add(procs.start("qstash", args, port=port, env={}, logs=running.logs))


def qstash_stats(url: str) -> dict[str, int]:
    """The QStash emulator's counts since it started (publish requests, messages accepted, ...)."""
    reply = httpx.get(f"{url}/__bench/stats", timeout=10)
    reply.raise_for_status()
    return dict(reply.json())


def qstash_keys(url: str) -> tuple[str, str]:
    reply = httpx.get(f"{url}/v2/keys", headers={"Authorization": f"Bearer {QSTASH_TOKEN}"}, timeout=10)
    reply.raise_for_status()
    keys = reply.json()
    return str(keys["current"]), str(keys["next"])


def notifier_env(
    database_name: str,
    providers: Providers,
    *,
    port: int,
    concurrency: int,
    log_level: str,
    qstash_url: str | None = None,
    embedded_dispatcher: bool = True,
) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "DATABASE_URL": database.sqlalchemy_url(database_name),
        "NOTIFIER_API_KEYS": API_KEY,
        "NOTIFIER_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "NOTIFIER_DISPATCHER": "local",
        "NOTIFIER_EMBEDDED_DISPATCHER": "true" if embedded_dispatcher else "false",
        "NOTIFIER_WORKERS": str(concurrency),
        "NOTIFIER_CHAT_DIGEST_SECONDS": "0",
        "NOTIFIER_LOG_LEVEL": log_level,
        "ONESIGNAL_APP_ID": ONESIGNAL_APP_ID,
        "ONESIGNAL_REST_API_KEY": ONESIGNAL_KEY,
        "ONESIGNAL_API_URL": providers.http_url,
        "KNOCK_API_KEY": KNOCK_KEY,
        "KNOCK_BASE_URL": providers.http_url,
        "ABLY_API_KEY": ABLY_KEY,
        "ABLY_REST_URL": providers.https_url,
        # The Ably SDK's httpx client trusts the fake's self-signed certificate through this.
        "SSL_CERT_FILE": str(providers.cert),
        "SSL_CERT_DIR": None,
    }
    if qstash_url is not None:
        current, following = qstash_keys(qstash_url)
        env |= {
            "NOTIFIER_DISPATCHER": "qstash",
            "QSTASH_URL": qstash_url,
            "QSTASH_TOKEN": QSTASH_TOKEN,
            "QSTASH_CURRENT_SIGNING_KEY": current,
            "QSTASH_NEXT_SIGNING_KEY": following,
        }
    return env


def start_notifier(
    running: Stack,
    name: str,
    database_name: str,
    providers: Providers,
    *,
    concurrency: int,
    workers: int = 1,
    dispatch_processes: int = 0,
    worker_nice: int = 0,
    log_level: str = "INFO",
    qstash_url: str | None = None,
    factory: str | None = None,
    attempts: bool = True,
) -> procs.Child:
    """notifier under uvicorn in a subprocess, configured from the environment like production.

    ``dispatch_processes`` > 0: the API runs with ``NOTIFIER_EMBEDDED_DISPATCHER=false`` beside that many
    ``notifier worker`` processes sharing ``concurrency``; they are the API's children (see bench/serve.py),
    so the returned child's process tree is the whole service. ``worker_nice``: the workers run under
    ``nice -n worker_nice``, as the README advises when the API and the workers share a host. Not ``attempts``:
    the API alone, with ``NOTIFIER_EMBEDDED_DISPATCHER=false`` and no worker: it accepts and stores, sends nothing.
    """
    if dispatch_processes and qstash_url is not None:
        raise ValueError("dispatch processes run the local dispatcher; the QStash variant has none")
    port = procs.free_port()
    env = notifier_env(
        database_name,
        providers,
        port=port,
        concurrency=concurrency,
        log_level=log_level,
        qstash_url=qstash_url,
        embedded_dispatcher=dispatch_processes == 0 and attempts,
    )
    args = [
        "-m",
        "uvicorn",
        factory or "bench.serve:notifier_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    args += ["--workers", str(workers), "--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "5"]
    if dispatch_processes:
        launcher = ["-m", "bench.serve", "--dispatch-processes", str(dispatch_processes)]
        launcher += ["--concurrency", str(concurrency), "--logs", str(running.logs), "--name", name]
        launcher += ["--worker-nice", str(worker_nice), "--"]
        args = launcher + args
    return running.add(procs.start(name, args, port=port, env=env, logs=running.logs))


def start_raw(running: Stack, database_name: str, providers: Providers, *, concurrency: int) -> procs.Child:
    port = procs.free_port()
    env: dict[str, str | None] = {
        "RAW_DATABASE_URL": database.dsn(database_name),
        "RAW_API_KEY": API_KEY,
        "RAW_CONCURRENCY": str(concurrency),
        "RAW_ONESIGNAL_URL": providers.http_url,
        "RAW_ONESIGNAL_APP_ID": ONESIGNAL_APP_ID,
        "RAW_ONESIGNAL_KEY": ONESIGNAL_KEY,
        "RAW_KNOCK_URL": providers.http_url,
        "RAW_KNOCK_KEY": KNOCK_KEY,
        "RAW_ABLY_URL": providers.https_url,
        "RAW_ABLY_KEY": ABLY_KEY,
        "RAW_CA_FILE": str(providers.cert),
    }
    args = ["-m", "uvicorn", "bench.raw_app:raw_app", "--factory", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "5"]
    return running.add(procs.start("raw", args, port=port, env=env, logs=running.logs))


def has_route(base_url: str, path: str) -> bool:
    """Whether notifier's OpenAPI document lists ``path``."""
    reply = httpx.get(f"{base_url}/openapi.json", timeout=10)
    return reply.is_success and path in reply.json().get("paths", {})
