"""Child processes of the bench: start, wait until they listen, sample RSS/CPU, stop (by pid only)."""

from __future__ import annotations

import contextlib
import os
import re
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


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle (all cores, since boot)."""
    t = psutil.cpu_times()
    return float(sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal")))


# A client backend's title: "postgres: 15/main: <user> <database> <host>(<port>) <state>".
_BACKEND_TITLE = re.compile(r"^postgres: \S+ \S+ (\S+) (?:[0-9a-fA-F.:]+\(\d+\)|\[local\])")


@dataclass(frozen=True)
class PostgresCpu:
    """CPU seconds so far of PostgreSQL's processes: those serving one database (its client backends and the
    server's shared processes: WAL writer, checkpointer, autovacuum ...) and the other databases' backends, by
    pid; and what the postmasters have reaped, which is where an exited backend's CPU goes (Linux adds a
    waited-for child's times to its parent's)."""

    ours: dict[int, float]
    others: dict[int, float]
    reaped: float

    @classmethod
    def read(cls, database: str) -> PostgresCpu:
        ours: dict[int, float] = {}
        others: dict[int, float] = {}
        reaped = 0.0
        for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            times, title = proc.info["cpu_times"], " ".join(proc.info["cmdline"] or ())
            if proc.info["name"] != "postgres" or times is None:
                continue
            if not title.startswith("postgres: "):  # a postmaster: the one process without a "postgres: " title
                reaped += getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
                continue
            backend = _BACKEND_TITLE.match(title)
            serving = ours if backend is None or backend.group(1) == database else others
            serving[proc.pid] = times.user + times.system
        return cls(ours, others, reaped)

    def since(self, before: PostgresCpu) -> float:
        """CPU seconds spent for the database since ``before``.

        A backend that exited in between (a pool closing a connection) is in no reading's pids but in the reaped
        time, whole: what it had used before ``before`` comes off. A backend of another database that both
        started and exited in between cannot be told apart and is counted too (a test run beside the bench).
        """
        grown = sum(cpu - before.ours.get(pid, 0.0) for pid, cpu in self.ours.items())
        alive = self.ours.keys() | self.others.keys()
        gone = [cpu for pid, cpu in (before.ours | before.others).items() if pid not in alive]
        return grown + (self.reaped - before.reaped) - sum(gone)


def reaped_children_cpu() -> float:
    """CPU seconds of this process's finished, reaped children (the load generator, run.mjs and its workers)."""
    t = os.times()
    return t.children_user + t.children_system


@dataclass(frozen=True)
class CpuSnapshot:
    """Where the machine's CPU had gone at one moment; two of them give the split of a run."""

    at: float
    machine: float
    service: float
    providers: float
    postgres: PostgresCpu
    children: float

    @classmethod
    def take(cls, *, service_pid: int, providers_pid: int, database: str) -> CpuSnapshot:
        return cls(
            at=time.monotonic(),
            machine=machine_busy(),
            service=tree_cpu(service_pid),
            providers=tree_cpu(providers_pid),
            postgres=PostgresCpu.read(database),
            children=reaped_children_cpu(),
        )

    def split_since(self, before: CpuSnapshot, *, deliveries: int) -> dict[str, float]:
        """CPU ms per delivery by part, and how busy the whole machine was (% of all cores), between two snapshots.

        "other" is what the machine spent outside the named parts (the bench's own process, the QStash
        emulator, Redis, anything else running). A PostgreSQL backend that exited in between counts as PostgreSQL's
        (``PostgresCpu.since``).
        """
        per = 1000 / max(deliveries, 1)
        postgres = self.postgres.since(before.postgres)
        parts = {
            "service": self.service - before.service,
            "postgres": postgres,
            "providers": self.providers - before.providers,
            "load": self.children - before.children,
        }
        machine = self.machine - before.machine
        split = {name: round(seconds * per, 3) for name, seconds in parts.items()}
        split["other"] = round(max(machine - sum(parts.values()), 0.0) * per, 3)
        wall = max(self.at - before.at, 1e-9)
        split["machine_busy_pct"] = round(100 * machine / (wall * (os.cpu_count() or 1)), 1)
        return split


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
