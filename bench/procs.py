"""Child processes of the bench: start, wait until they listen, sample RSS/CPU, stop (by pid only)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], *, timeout: float = 60.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s ({proc.args!r})")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def start(
    name: str, args: Sequence[str], *, port: int, env: dict[str, str | None], logs: Path, timeout: float = 60.0
) -> Child:
    """Start ``args`` (python -m ... when it starts with "-m") in its own process group; wait for ``port``.

    ``env`` is laid over this process's environment; a None value removes the variable.
    """
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    command = [sys.executable, *args] if args[0] == "-m" else list(args)
    full = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    child = Child(name, proc, port, log)
    try:
        wait_for_port(port, proc, timeout=timeout, log=log)
    except BaseException:
        stop(child)
        raise
    return child


def stop(child: Child, *, timeout: float = 20.0) -> None:
    """SIGTERM the child's process group (e.g. uvicorn's workers, notifier's dispatch processes), wait for all of
    it to exit, and SIGKILL what is left after ``timeout``."""
    if child.proc.poll() is not None:
        return
    descendants = tree(child.proc.pid)[1:]  # the root's exit does not wait for them (dispatch processes)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, signal.SIGTERM)
    try:
        child.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait(5)
    deadline = time.monotonic() + timeout
    while (alive := [p for p in descendants if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _running(process: psutil.Process) -> bool:
    # An orphan is reaped by whoever adopts it; until then it is a zombie that has finished all the same.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of the process tree so far (children that exited are not counted)."""
    total = 0.0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@dataclass
class Sampler:
    """Samples a process tree's RSS every ``interval`` seconds in a thread: ``(t, rss bytes)``."""

    pid: int
    interval: float = 0.2
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextlib.contextmanager
    def running(self) -> Iterator[Sampler]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), tree_rss(self.pid)))
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)
