"""notifier as ``notifier serve`` builds it, as a uvicorn factory so the bench can pass ``--workers N``.

``uvicorn bench.serve:notifier_app --factory`` = ``Settings()`` from the environment, JSON logging,
``create_app(settings)``: exactly what the CLI serves, nothing added.

``python -m bench.serve --dispatch-processes N ...`` is the split deployment: N ``notifier worker``
processes, then the API (with ``NOTIFIER_EMBEDDED_DISPATCHER=false`` in the environment) in place of
the launcher; see ``launch_split``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from starlette.applications import Starlette

from notifier.app import create_app
from notifier.config import Settings
from notifier.logs import configure_logging


def notifier_app() -> Starlette:
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def notifier_app_experiment() -> Starlette:
    """``notifier_app`` with the connection pool's pre-ping off: measures a recommended change to notifier/db.py.

    Every pool checkout pings with three round trips (BEGIN; SELECT; ROLLBACK on asyncpg) and an in-app
    delivery checks out three connections. Used by ``./dev bench --experiment no-pre-ping`` only.
    """
    from typing import Any

    from notifier import db

    original = db.create_async_engine

    def without_pre_ping(url: str, **kwargs: Any) -> Any:
        return original(url, **{**kwargs, "pool_pre_ping": False})

    db.create_async_engine = without_pre_ping  # type: ignore[assignment]
    return notifier_app()


def share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split as evenly as possible into ``parts`` (the first ones get the remainder)."""
    return total // parts + (1 if index < total % parts else 0)


def launch_split(argv: list[str]) -> None:
    """Start ``--dispatch-processes`` ``notifier worker`` processes, wait until each is ready, then exec the API.

    ``python -m bench.serve --dispatch-processes N --concurrency C --logs DIR -- -m uvicorn ...``. The API
    replaces this process (exec), so the workers are children of the service's pid: the bench's RSS and CPU
    sampling of that process tree, py-spy's ``--subprocesses`` and the stop signal to its process group
    cover them with nothing else to track. ``NOTIFIER_WORKERS`` is C split across the N workers, so as many
    deliveries are in flight in total as with the embedded dispatcher.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--dispatch-processes", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--logs", type=Path, required=True, help="worker i logs to DIR/NAME-worker-i.log")
    parser.add_argument("--name", default="notifier")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument(
        "--worker-nice", type=int, default=0, help="run the workers under `nice -n N` (the API keeps priority 0)"
    )
    parser.add_argument("api", nargs=argparse.REMAINDER, help="-- then the API's python arguments")
    args = parser.parse_args(argv)
    api = args.api[1:] if args.api[:1] == ["--"] else args.api
    if args.concurrency < args.dispatch_processes:
        parser.error("--concurrency must be >= --dispatch-processes (it is split across them)")
    workers = []
    for index in range(args.dispatch_processes):
        log = args.logs / f"{args.name}-worker-{index}.log"
        env = {**os.environ, "NOTIFIER_WORKERS": str(share(args.concurrency, args.dispatch_processes, index))}
        with log.open("wb") as out:
            command = [sys.executable, "-m", "notifier.cli", "worker"]
            if args.worker_nice:
                command = ["nice", "-n", str(args.worker_nice), *command]
            workers.append((subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + args.ready_timeout
    for process, log in workers:
        while b"notifier worker ready" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                for other, _ in workers:
                    other.terminate()
                sys.exit(f"{log.name}: the worker did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
    os.execv(sys.executable, [sys.executable, *api])


if __name__ == "__main__":
    launch_split(sys.argv[1:])
