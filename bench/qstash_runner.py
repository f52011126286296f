"""The test suite's QStash emulator (tests/fakes/qstash.py) in its own process, for the QStash variant.

It signs and delivers every published message to its destination (notifier's
``/v1/qstash/deliveries/{id}``, or ``/v1/qstash/groups/{id}`` for a send group), with at most
``--concurrency`` deliveries in flight (the same concurrency the other variants get).
``GET /__bench/stats`` counts, since the start: the publish API's requests (``publish_requests``: one
per ``/v2/publish`` or ``/v2/batch`` call), the messages published in them (``published``), those
accepted as new (``accepted``: what QStash bills) and deduplicated (``deduplicated``), and says how
many are still pending.
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
        self.publish_requests = 0
        self.published = 0
        self.accepted = 0
        self.deduplicated = 0

    async def start_engine(self) -> None:
        if self._http is None:
            limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
            self._http = httpx.AsyncClient(trust_env=False, limits=limits)

    async def attempt(self, message: Message, retried: int) -> DeliveryAttempt:
        async with self._slots:
            return await super().attempt(message, retried)

    async def _publish(self, request: Request) -> Response:
        self.publish_requests += 1
        return await super()._publish(request)

    async def _batch(self, request: Request) -> Response:
        self.publish_requests += 1
        return await super()._batch(request)

    def _accept(
        self, destination: str, headers: dict[str, str], body: bytes, schedule_id: str | None = None
    ) -> tuple[dict[str, Any], int]:
        reply, status = super()._accept(destination, headers, body, schedule_id)
        self.published += 1
        if reply.get("deduplicated"):
            self.deduplicated += 1
        else:
            self.accepted += 1
        return reply, status

    async def _stats(self, request: Request) -> Response:
        log = self.deliveries_log
        return JSONResponse(
            {
                "publish_requests": self.publish_requests,
                "published": self.published,
                "accepted": self.accepted,
                "deduplicated": self.deduplicated,
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
