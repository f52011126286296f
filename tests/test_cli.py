"""The `notifier` command as a user runs it: real processes, real ports, real files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import PG_ADMIN, _asyncpg_url, _create_database, _drop_database
from tests.fakes.base import free_port

NOTIFIER = [sys.executable, "-m", "notifier.cli"]
BOOKING = {"booking_id": "b-1", "guest_name": "Ann Lee", "property": "Seaview 4", "check_in": "2026-12-01"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("NOTIFIER_", "QSTASH_", "ONESIGNAL_", "KNOCK_", "SMTP_", "ABLY_", "DATABASE_URL", "FORWARDED_ALLOW_IPS")
        )
    }
    env.update(extra)
    return env


def wait_ready(url: str, process: subprocess.Popen[str], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"notifier exited early:\n{process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("notifier did not become ready")


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    name = f"notifier_cli_{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(_create_database(name))
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL unreachable at {PG_ADMIN}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN}")
    yield _asyncpg_url(name)
    asyncio.run(_drop_database(name))


def test_embedded_default_serves_with_a_generated_key_and_delivers_to_the_inbox(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [*NOTIFIER, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(url, process)
        key_file = tmp_path / "notifier.db.api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/events", timeout=5).status_code == 401  # never open
        posted = httpx.post(
            f"{url}/v1/events",
            headers=auth,
            timeout=5,
            json={"type": "booking.confirmed", "recipients": ["user-1"], "data": BOOKING},
        )
        assert posted.status_code == 202
        for _ in range(100):
            inbox = httpx.get(f"{url}/v1/users/user-1/inbox", headers=auth, timeout=5).json()
            if inbox["data"]:
                break
            time.sleep(0.05)
        assert inbox["data"][0]["title"] == "Booking confirmed: Seaview 4"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in stderr
    assert str(tmp_path / "notifier.db.api-key") in stderr  # it says where the key is ...
    assert key not in stderr  # ... and never prints the key itself
    assert (tmp_path / "notifier.db").exists()


def test_serve_refuses_postgres_without_api_keys(fresh_postgres: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [*NOTIFIER, "serve", "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(DATABASE_URL=fresh_postgres),
    )
    assert result.returncode == 2
    assert "NOTIFIER_API_KEYS" in result.stderr


def test_serve_refuses_an_unmigrated_postgres_then_migrate_fixes_it(fresh_postgres: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=fresh_postgres, NOTIFIER_API_KEYS="cli-test-key-0123456789-abcdefghijklmn")
    port = free_port()
    refused = subprocess.run(
        [*NOTIFIER, "serve", "--port", str(port)], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode == 2
    assert "notifier migrate" in refused.stderr
    for _ in range(2):  # idempotent
        migrated = subprocess.run([*NOTIFIER, "migrate"], capture_output=True, text=True, timeout=60, env=env)
        assert migrated.returncode == 0, migrated.stderr
    process = subprocess.Popen(
        [*NOTIFIER, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def test_send_test_stores_an_inbox_message(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'n.db'}")
    result = subprocess.run(
        [*NOTIFIER, "send-test", "--user", "user-1", "--channel", "in_app"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert '"status": "sent"' in result.stdout
    unconfigured = subprocess.run(
        [*NOTIFIER, "send-test", "--user", "user-1", "--channel", "push"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert unconfigured.returncode == 2
    assert "no configured provider" in unconfigured.stderr


def test_serve_refuses_a_short_api_key_and_says_why(tmp_path: Path) -> None:
    short = "only-twenty-six-characters"
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", NOTIFIER_API_KEYS=short)
    process = subprocess.Popen(
        [*NOTIFIER, "serve", "--port", str(free_port())], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # it started serving: the refusal is missing
            process.kill()
            process.communicate()
    assert process.returncode == 2, stderr
    assert "NOTIFIER_API_KEYS: Value error, key 1 of 1 is 26 characters" in stderr
    assert "at least 32" in stderr
    assert short not in stderr
    assert "Traceback" not in stderr


def test_bad_configuration_is_reported_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [*NOTIFIER, "migrate"], capture_output=True, text=True, timeout=60, env=clean_env(DATABASE_URL="mysql://nope")
    )
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_retention_deletes_only_old_finished_events(tmp_path: Path) -> None:
    import datetime as dt
    import sqlite3

    db_file = tmp_path / "n.db"
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{db_file}", NOTIFIER_RETENTION_DAYS="30")
    assert subprocess.run([*NOTIFIER, "migrate"], capture_output=True, text=True, timeout=60, env=env).returncode == 0
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=31)).replace(tzinfo=None).isoformat(sep=" ")
    new = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")
    with sqlite3.connect(db_file) as connection:
        for event_id, received in (("a" * 32, old), ("b" * 32, new)):
            connection.execute(
                "INSERT INTO events (id, type, body_hash, data, recipients, source, received_at) "
                "VALUES (?, 'booking.confirmed', 'h', '{}', '[]', 'api', ?)",
                (event_id, received),
            )
    result = subprocess.run([*NOTIFIER, "retention"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert '"events_deleted": 1' in result.stdout
    assert '"preference_changes_deleted": 0' in result.stdout
    with sqlite3.connect(db_file) as connection:
        assert connection.execute("SELECT id FROM events").fetchall() == [("b" * 32,)]


def wait_for_line(log: Path, text: str, process: subprocess.Popen[str], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"{process.args!r} exited early:\n{log.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {log}:\n{log.read_text()}")


def test_worker_beside_serve_sends_what_the_api_accepts_and_stops_on_sigterm(
    fresh_postgres: str, tmp_path: Path
) -> None:
    key = "cli-test-key-0123456789-abcdefghijklmn"
    # A 30 s poll on both sides: an in-app message within seconds can only come from the API's NOTIFY.
    env = clean_env(
        DATABASE_URL=fresh_postgres,
        NOTIFIER_API_KEYS=key,
        NOTIFIER_EMBEDDED_DISPATCHER="false",
        NOTIFIER_POLL_INTERVAL_SECONDS="30",
    )
    refused = subprocess.run([*NOTIFIER, "worker"], capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2
    assert "notifier migrate" in refused.stderr
    migrated = subprocess.run([*NOTIFIER, "migrate"], capture_output=True, text=True, timeout=60, env=env)
    assert migrated.returncode == 0, migrated.stderr

    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    worker_log, serve_log = tmp_path / "worker.log", tmp_path / "serve.log"
    with worker_log.open("w") as worker_err, serve_log.open("w") as serve_err:
        worker = subprocess.Popen(
            [*NOTIFIER, "worker", "--metrics-port", str(metrics_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=worker_err,
            text=True,
        )
        serve = subprocess.Popen(
            [*NOTIFIER, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=serve_err, text=True
        )
    try:
        wait_for_line(worker_log, "notifier worker ready", worker)
        wait_ready(url, serve)
        auth = {"Authorization": f"Bearer {key}"}
        posted = httpx.post(
            f"{url}/v1/events",
            headers=auth,
            timeout=5,
            json={"type": "booking.confirmed", "recipients": ["user-1"], "data": BOOKING},
        )
        assert posted.status_code == 202
        event_url = f"{url}/v1/events/{posted.json()['event_id']}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            deliveries = httpx.get(event_url, headers=auth, timeout=5).json()["deliveries"]
            if [d["status"] for d in deliveries if d["channel"] == "in_app"] == ["sent"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the worker did not send the in-app delivery:\n{worker_log.read_text()}")
        # The attempt happened in the worker, so its own metrics endpoint counts it.
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'notifier_delivery_attempts_total{channel="in_app",outcome="sent"} 1.0' in scraped
    finally:
        for process in (serve, worker):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert worker.returncode == 0, worker_log.read_text()
    worker_lines = worker_log.read_text()
    entries = [json.loads(line) for line in worker_lines.splitlines() if line.startswith("{")]
    assert any(entry.get("listening") is True for entry in entries)
    # Each process tuned its garbage collector once started (notifier.heap).
    assert [entry.get("gc_tuned") for entry in entries if entry.get("msg") == "notifier worker ready"] == [True]
    served = [json.loads(line) for line in serve_log.read_text().splitlines() if line.startswith("{")]
    assert [entry.get("gc_tuned") for entry in served if entry.get("msg") == "notifier ready"] == [True]
    assert "notifier worker stopped" in worker_lines
    assert "Traceback" not in worker_lines


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("worker", {}, "`notifier worker` needs PostgreSQL"),
        ("serve", {"NOTIFIER_EMBEDDED_DISPATCHER": "false"}, "NOTIFIER_EMBEDDED_DISPATCHER=false needs PostgreSQL"),
    ],
)
def test_sqlite_stays_one_process(command: str, extra: dict[str, str], message: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", **extra)
    result = subprocess.run([*NOTIFIER, command], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_refuses_qstash_mode(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL="postgresql+asyncpg://127.0.0.1/unused", QSTASH_TOKEN="qstash-token-0123456789")
    result = subprocess.run([*NOTIFIER, "worker"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "no worker process is needed" in result.stderr


def test_an_installed_wheel_migrates_and_serves(fresh_postgres: str, tmp_path: Path) -> None:
    """The wheel carries everything `notifier migrate` and `notifier serve` need (migrations, catalog, pages).

    Built from this checkout and installed into a new virtualenv outside it, with no network: the dependencies
    come from the test's own environment (a .pth line), notifier itself only from the wheel.
    """
    root = Path(__file__).resolve().parent.parent
    checkout, wheels, venv, elsewhere = tmp_path / "checkout", tmp_path / "wheels", tmp_path / "venv", tmp_path / "run"
    elsewhere.mkdir()
    # A clean checkout of the working tree: the files git would commit, no build/ or egg-info left from before.
    listed = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, text=True)
    for name in filter(None, listed.split("\0")):
        if (root / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, checkout / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(checkout)]
    subprocess.run(build, check=True, capture_output=True, timeout=240, cwd=tmp_path)
    [wheel] = wheels.glob("notifier-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True, timeout=120)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(python), "-c", purelib], text=True).strip())
    ours = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (site / "dependencies.pth").write_text(f"{ours}\n")  # a path line: the editable notifier there stays unseen
    env = clean_env(DATABASE_URL=fresh_postgres, NOTIFIER_API_KEYS="wheel-test-key-0123456789-abcdefghij")
    where = subprocess.run(
        [str(python), "-c", "import notifier, notifier.migrations as m; print(notifier.__file__, m.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=elsewhere, env=env, check=True,
    ).stdout.split()  # fmt: skip
    assert all(Path(path).is_relative_to(site) for path in where), where
    notifier = str(venv / "bin" / "notifier")
    migrated = subprocess.run(
        [notifier, "migrate"], capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env
    )
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    process = subprocess.Popen(
        [notifier, "serve", "--port", str(port)], cwd=elsewhere, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        page = httpx.get(f"http://127.0.0.1:{port}/preferences", timeout=5)
        assert page.status_code == 200  # the page's template is in the wheel
        assert "/web/static/preferences.js" in page.text  # and so are its static files
        event = {"type": "booking.confirmed", "recipients": ["user-1"], "data": BOOKING}
        key = {"Authorization": f"Bearer {env['NOTIFIER_API_KEYS']}"}
        posted = httpx.post(f"http://127.0.0.1:{port}/v1/events", json=event, headers=key, timeout=10)
        assert posted.status_code == 202, posted.text  # the catalog is in the wheel, and the schema was migrated
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
PROXY_KEY = "proxy-test-key-0123456789-abcdefghijkl"


@pytest.mark.parametrize(
    ("environment", "flag", "trusted"),
    [
        ({}, [], True),  # the default: only 127.0.0.1, a proxy on this host, is trusted
        ({"FORWARDED_ALLOW_IPS": "192.0.2.1"}, [], False),  # uvicorn's own variable names the proxy
        ({"FORWARDED_ALLOW_IPS": "127.0.0.1"}, ["--forwarded-allow-ips", "192.0.2.1"], False),  # the flag wins
        ({"FORWARDED_ALLOW_IPS": "192.0.2.1"}, ["--forwarded-allow-ips", "127.0.0.1"], True),
    ],
    ids=["default", "env-names-another-proxy", "flag-over-env", "flag-names-this-peer"],
)
def test_serve_takes_x_forwarded_for_only_from_the_proxies_it_was_told_of(
    tmp_path: Path, environment: dict[str, str], flag: list[str], trusted: bool
) -> None:
    """Over real HTTP: five failed sign-ins, each claiming another client address, then the right key. From an
    untrusted peer the claims are ignored, so the sign-in limiter counts the peer (127.0.0.1) and locks it out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", NOTIFIER_API_KEYS=PROXY_KEY, **environment)
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*NOTIFIER, "serve", "--port", str(port), *flag], cwd=tmp_path, env=env, stderr=stderr, text=True
        )
    try:
        wait_ready(url, process)
        with httpx.Client(base_url=url, timeout=5) as client:
            for n in range(5):
                refused = client.post(
                    "/dashboard/login",
                    data={"key": f"wrong-key-{n}-0123456789-abcdefghijkl"},
                    headers={"X-Forwarded-For": f"203.0.113.{n + 1}"},
                )
                assert refused.status_code == 401
            last = client.post("/dashboard/login", data={"key": PROXY_KEY}, headers={"X-Forwarded-For": "203.0.113.9"})
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    if trusted:
        assert last.status_code == 303  # five different clients behind a trusted proxy: nobody locked out
        assert "dashboard sign-in locked" not in log.read_text()
    else:
        assert last.status_code == 429, last.text  # the peer's own five failures, whatever it claimed
        assert "dashboard sign-in locked for 127.0.0.1" in log.read_text()


def test_the_docker_image_trusts_no_forwarded_header_unless_told_the_proxy() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    commands = [line for line in lines if line.startswith(("CMD", "ENTRYPOINT"))]
    assert len(commands) == 1
    assert "notifier serve" in commands[0]
    assert "forwarded-allow-ips" not in commands[0]  # so FORWARDED_ALLOW_IPS (unset: 127.0.0.1) decides
    assert "proxy-headers" not in commands[0]
    assert not [line for line in lines if "FORWARDED_ALLOW_IPS" in line and not line.lstrip().startswith("#")]
