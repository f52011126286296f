"""Start-up as a user meets it, through the real `notifier` command: a setting that cannot work stops it with one
error line naming the setting (never a traceback, never a secret); one that may be meant is a warning."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.base import free_port, refused_url
from tests.fakes.qstash import QStashEmulator
from tests.test_cli import NOTIFIER, clean_env, wait_ready

QSTASH_TOKEN = "qstash-token-never-echoed-0123456789"
SIGNING_KEYS = {
    "QSTASH_CURRENT_SIGNING_KEY": "sig_current_0123456789",
    "QSTASH_NEXT_SIGNING_KEY": "sig_next_0123456789",
}


def sqlite_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", **extra)


def entries(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines; anything else on stderr (a traceback) fails the test."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert all(line.startswith("{") for line in lines), stderr
    return [json.loads(line) for line in lines]


def refusal(*args: str, env: dict[str, str], cwd: Path) -> str:
    """Run `notifier ARGS`, which must refuse: exit non-zero, with one error line. Returns that line's message."""
    try:
        result = subprocess.run([*NOTIFIER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:  # killed: it was serving instead of refusing
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr
        raise AssertionError(f"`notifier {' '.join(args)}` started instead of refusing:\n{stderr}") from None
    assert result.returncode != 0, result.stderr
    errors = [entry["msg"] for entry in entries(result.stderr) if entry["level"] == "error"]
    assert len(errors) == 1, result.stderr
    assert "\n" not in errors[0]
    return str(errors[0])


def serve_briefly(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    """Start `notifier serve`, wait until it is ready, stop it; return its log lines."""
    port = free_port()
    log = cwd / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*NOTIFIER, "serve", "--port", str(port)], cwd=cwd, env=env, stderr=stderr, text=True
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    return entries(log.read_text())


def test_serve_in_qstash_mode_refuses_to_start_without_the_signing_keys(tmp_path: Path) -> None:
    """Without them every QStash callback would be a 401: events accepted, nothing ever delivered."""
    env = sqlite_env(tmp_path, QSTASH_TOKEN=QSTASH_TOKEN, QSTASH_CURRENT_SIGNING_KEY="sig_current_0123456789")
    message = refusal("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert "QSTASH_NEXT_SIGNING_KEY" in message
    assert "not set: QSTASH_NEXT_SIGNING_KEY" in message
    assert QSTASH_TOKEN not in message


def test_serve_in_qstash_mode_warns_that_qstash_cannot_call_a_loopback_public_url(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path, QSTASH_TOKEN=QSTASH_TOKEN, **SIGNING_KEYS)  # NOTIFIER_PUBLIC_URL: the default
    logged = serve_briefly(env, tmp_path)
    [warning] = [entry["msg"] for entry in logged if "NOTIFIER_PUBLIC_URL" in entry["msg"]]
    assert "http://127.0.0.1:8000, a loopback address" in warning
    assert [entry["level"] for entry in logged if entry["msg"] == warning] == ["warning"]
    assert not any(QSTASH_TOKEN in entry["msg"] for entry in logged)


@pytest.mark.parametrize(
    ("setting", "values", "secret"),
    [
        ("NOTIFIER_LOG_LEVEL", {"NOTIFIER_LOG_LEVEL": "LOUD"}, None),
        (
            "ABLY_REST_URL",
            {"ABLY_API_KEY": "app.key:ably-secret-0123456789", "ABLY_REST_URL": "http://rest.example.com"},
            "ably-secret-0123456789",
        ),
        ("ABLY_API_KEY", {"ABLY_API_KEY": "garbage-ably-key-0123456789"}, "garbage-ably-key-0123456789"),
        ("NOTIFIER_APP_URL", {"NOTIFIER_APP_URL": "app.example.com"}, None),
    ],
    ids=["log-level", "ably-over-http", "ably-key-shape", "app-url-not-absolute"],
)
def test_serve_refuses_a_bad_setting_in_one_line_naming_it(
    tmp_path: Path, setting: str, values: dict[str, str], secret: str | None
) -> None:
    message = refusal("serve", "--port", str(free_port()), env=sqlite_env(tmp_path, **values), cwd=tmp_path)
    assert message.startswith(f"invalid configuration: {setting}: "), message
    if secret is not None:
        assert secret not in message


@pytest.mark.parametrize(
    ("contents", "reason"),
    [(None, "No such file or directory"), ("[event_types.x\n", "Expected ']' at the end of a table")],
    ids=["missing", "not-toml"],
)
def test_serve_refuses_a_catalog_file_it_cannot_use_in_one_line(
    tmp_path: Path, contents: str | None, reason: str
) -> None:
    catalog = tmp_path / "catalog.toml"
    if contents is not None:
        catalog.write_text(contents)
    env = sqlite_env(tmp_path, NOTIFIER_CATALOG_PATH=str(catalog))
    message = refusal("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert message.startswith("invalid configuration: NOTIFIER_CATALOG_PATH: "), message
    assert reason in message


def test_serve_refuses_a_short_key_in_the_key_file_in_one_line(tmp_path: Path) -> None:
    key_file = tmp_path / "n.db.api-key"
    key_file.write_text("short-key-in-the-file\n")
    key_file.chmod(0o600)
    message = refusal("serve", "--port", str(free_port()), env=sqlite_env(tmp_path), cwd=tmp_path)
    assert f"the API key in {key_file} is 21 characters" in message
    assert "short-key-in-the-file" not in message


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620], ids=lambda mode: f"{mode:04o}")
def test_serve_refuses_a_key_file_other_users_may_read_or_write(tmp_path: Path, mode: int) -> None:
    """It used to start and log that the file was "readable by its owner only", whatever its mode."""
    key = "nk_hand-made-key-0123456789-abcdefghijklmn"
    key_file = tmp_path / "n.db.api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(mode)
    env = sqlite_env(tmp_path)
    message = refusal("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert f"the API key file {key_file} is open to other users (mode {mode:04o})" in message
    assert f"chmod 600 {key_file}" in message
    assert key not in message
    key_file.chmod(0o600)  # as the message says: then it starts, and what it logs about the file is true
    logged = serve_briefly(env, tmp_path)
    assert any(f"using the API key in {key_file} (readable by its owner only)" in entry["msg"] for entry in logged)
    assert not any(key in entry["msg"] for entry in logged)


def schedules_sync(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `notifier schedules sync`, which must fail; (exit code, its one error line)."""
    result = subprocess.run(
        [*NOTIFIER, "schedules", "sync"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    errors = [entry["msg"] for entry in entries(result.stderr) if entry["level"] == "error"]
    assert len(errors) == 1, result.stderr
    assert QSTASH_TOKEN not in result.stderr + result.stdout
    return result.returncode, str(errors[0])


def test_schedules_sync_says_in_one_line_that_qstash_is_unreachable(tmp_path: Path) -> None:
    qstash_url = refused_url()
    code, message = schedules_sync(sqlite_env(tmp_path, QSTASH_TOKEN=QSTASH_TOKEN, QSTASH_URL=qstash_url), tmp_path)
    assert code == 1
    assert message.startswith(f"cannot sync the QStash schedules at {qstash_url}: ConnectError"), message


def test_schedules_sync_says_in_one_line_that_qstash_refused_it(
    tmp_path: Path, qstash_emulator: QStashEmulator
) -> None:
    env = sqlite_env(tmp_path, QSTASH_TOKEN=QSTASH_TOKEN, QSTASH_URL=qstash_emulator.url)  # not the emulator's token
    code, message = schedules_sync(env, tmp_path)
    assert code == 1
    assert message.startswith(f"cannot sync the QStash schedules at {qstash_emulator.url}: QStashError"), message
    assert "Unauthorized" in message
    assert qstash_emulator.schedules == {}


def test_schedules_sync_refuses_a_public_url_qstash_cannot_call(tmp_path: Path) -> None:
    """The real QStash (the default QSTASH_URL) would be told to call http://127.0.0.1:8000/... every minute."""
    code, message = schedules_sync(sqlite_env(tmp_path, QSTASH_TOKEN=QSTASH_TOKEN), tmp_path)
    assert code == 2
    assert message.startswith("NOTIFIER_PUBLIC_URL is http://127.0.0.1:8000, a loopback address"), message


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_unreachable_database_is_named_with_its_address_and_the_cause(tmp_path: Path, command: str) -> None:
    """It used to say only "cannot reach the database: NotReady"."""
    port = free_port()
    password = "db-password-never-shown-0123"
    env = clean_env(
        DATABASE_URL=f"postgresql+asyncpg://notifier:{password}@127.0.0.1:{port}/notifications",
        NOTIFIER_API_KEYS="cli-test-key-0123456789-abcdefghijklmn",
        NOTIFIER_EMBEDDED_DISPATCHER="false",
    )
    args = [command, "--port", str(free_port())] if command == "serve" else [command]
    message = refusal(*args, env=env, cwd=tmp_path)
    assert message.startswith(f"cannot connect to the database at 127.0.0.1:{port}/notifications: "), message
    assert "ConnectionRefusedError" in message
    assert password not in message
