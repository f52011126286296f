"""The BullMQ baselines (bench/bullmq/run.mjs, Node.js + Redis) against the same fake provider: plain, and
with every delivery tracked in PostgreSQL (``pg_url``).

Returns run.mjs's one JSON line, or ``{"skipped": "why"}`` when node, npm or Redis cannot be had.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.procs import REPO

BULLMQ_DIR = REPO / "bench" / "bullmq"
REDIS_URL = "redis://127.0.0.1:6379"
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
    "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def _redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stale(directory: Path) -> bool:
    """Whether ``node_modules`` is missing or older than ``package-lock.json`` (a dependency was added)."""
    installed = directory / "node_modules" / ".package-lock.json"  # npm's record of what it installed
    return not installed.exists() or installed.stat().st_mtime < (directory / "package-lock.json").stat().st_mtime


def ensure_ready() -> str | None:
    """Install bench/bullmq's packages and start Redis if needed; return why BullMQ must be skipped, or None."""
    if not (BULLMQ_DIR / "run.mjs").exists():
        return "bench/bullmq/run.mjs is missing"
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found on PATH"
    if _stale(BULLMQ_DIR):
        installed = subprocess.run(
            ["npm", "ci", "--prefix", str(BULLMQ_DIR)], capture_output=True, text=True, timeout=600, check=False
        )
        if installed.returncode != 0:
            return f"npm ci --prefix bench/bullmq failed: {installed.stderr.strip()[-300:]}"
    if not _redis_answers() and shutil.which("redis-server") is not None:
        subprocess.run(REDIS_START, capture_output=True, timeout=30, check=False)
        for _ in range(50):
            if _redis_answers():
                break
            time.sleep(0.1)
    if not _redis_answers():
        return "Redis does not answer on 127.0.0.1:6379 and could not be started"
    return None


def run(
    *,
    events: int,
    concurrency: int,
    processes: int,
    provider_url: str,
    prefix: str,
    timeout: float = 900,
    workload: Path | None = None,
    pg_url: str | None = None,
) -> dict[str, Any]:
    """Run run.mjs once: ``events`` generated events (1-5 recipients, 1-3 channels), or those of ``workload``
    (a JSON file of planned deliveries); with ``pg_url``, tracking every delivery in that database."""
    why = ensure_ready()
    if why is not None:
        return {"skipped": why}
    command = ["node", str(BULLMQ_DIR / "run.mjs"), "--concurrency", str(concurrency), "--provider-url", provider_url]
    if workload is not None:
        command += ["--workload", str(workload)]
    else:
        command += ["--events", str(events), "--recipients-min", "1", "--recipients-max", "5"]
    if pg_url is not None:
        command += ["--pg-url", pg_url]
    command += ["--redis", REDIS_URL, "--queue-prefix", prefix, "--processes", str(processes)]
    # run.mjs gives up by itself a little before we would kill it, so its own report explains the stop.
    command += ["--timeout", str(max(1, int(timeout) - 10))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"run.mjs did not finish within {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"skipped": f"run.mjs exited {done.returncode}: {done.stderr.strip()[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result
