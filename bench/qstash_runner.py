"""The test suite's QStash emulator (tests/fakes/qstash.py) in its own process, for the QStash variant.

It signs and delivers every published message to notifier's ``/v1/qstash/deliveries/{id}``, with at
most ``--concurrency`` deliveries in flight (the same concurrency the other variants get).
``GET /__bench/stats`` says how many messages are still pending.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.qstash import QStashEmulator
from tests.fakes.qstash_delivery import DeliveryAttempt, Message


class BenchEmulator(QStashEmulator):
    def __init__(self, *, concurrency: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self.app.router.routes.insert(0, Route("/__bench/stats", self._stats, methods=["GET"]))

    async def start_engine(self) -> None:
        if self._http is None:
            limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
            self._http = httpx.AsyncClient(trust_env=False, limits=limits)

    async def attempt(self, message: Message, retried: int) -> DeliveryAttempt:
        async with self._slots:
            return await super().attempt(message, retried)

    async def _stats(self, request: Request) -> Response:
        log = self.deliveries_log
        return JSONResponse(
            {
                "pending": len(self._tasks),
                "messages": len(self.messages),
                "attempts": len(log),
                "ok": sum(1 for a in log if a.ok),
                "dlq": len(self.dlq),
            }
        )


async def serve(port: int, token: str, concurrency: int) -> None:
    # Real-time delays: a deferred (quiet-hours) delivery stays deferred for the run, as with local dispatch.
    emulator = BenchEmulator(
        token=token, concurrency=concurrency, attempt_timeout=30.0, time_scale=1.0, max_wait=7 * 86400.0
    )
    emulator._loop = asyncio.get_running_loop()
    await emulator.start_engine()
    config = uvicorn.Config(
        emulator.app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await emulator.stop_engine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.token, args.concurrency))


if __name__ == "__main__":
    main()
