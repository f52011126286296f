"""The load generator, in its own process (``python -m bench.loadgen CONFIG.json``).

A raw-socket HTTP/1.1 client (keep-alive connections over asyncio streams, no HTTP library) so the
generator costs a fraction of the CPU the service under test spends. Two modes:

* closed loop (``rate`` 0): ``connections`` clients each send the next event as soon as the previous
  one is answered -- the maximum rate the service accepts;
* open loop (``rate`` > 0): event i is due at ``start + i / rate`` and its latency is counted from that
  moment, so a slow service cannot hide its queueing (no coordinated omission).

It writes one JSON document: per event (index, due, sent, answered, status, deliveries as
``[id, channel, status, user id]``), all times in wall-clock seconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length) if length else b""
    parts = []
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return status, b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readline()


class Client:
    """One keep-alive connection; reconnects if the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            try:
                self.writer.write(payload)
                return await _read_response(self.reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.writer.close()
                self.writer = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_request(host: str, port: int, path: str, token: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run(config: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(config["url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    bodies = [line for line in Path(config["events_file"]).read_bytes().splitlines() if line]
    requests = [build_request(host, port, config.get("path", "/v1/events"), config["token"], b) for b in bodies]
    rate = float(config.get("rate") or 0)
    connections = int(config.get("connections", 32))
    results: list[Any] = [None] * len(requests)
    raw: list[bytes] = [b""] * len(requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    start = time.time() + 0.05

    async def worker() -> None:
        client = Client(host, port)
        try:
            while True:
                i = await queue.get()
                if i < 0:
                    return
                due = start + i / rate if rate else None
                sent = time.time()
                try:
                    status, body = await client.request(requests[i])
                except OSError as exc:
                    status, body = 0, f"{type(exc).__name__}: {exc}".encode()
                answered = time.time()
                results[i] = [i, due if due is not None else sent, sent, answered, status]
                raw[i] = body
        finally:
            client.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.sleep(max(0.0, start - time.time()))
    if rate:
        for i in range(len(requests)):
            delay = start + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(i)
    else:
        for i in range(len(requests)):
            queue.put_nowait(i)
    for _ in workers:
        queue.put_nowait(-1)
    await asyncio.gather(*workers)
    errors = []
    for i, result in enumerate(results):
        deliveries: list[Any] = []
        if 200 <= result[4] < 300:
            reply = json.loads(raw[i])
            deliveries = [[d["id"], d["channel"], d["status"], d["user_id"]] for d in reply.get("deliveries", [])]
        elif len(errors) < 5:
            errors.append(f"event {i}: {result[4]} {raw[i][:300]!r}")
        result.append(deliveries)
    return {"start": start, "rate": rate, "connections": connections, "results": results, "errors": errors}


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    try:
        import uvloop

        out = uvloop.run(run(config))
    except ImportError:
        out = asyncio.run(run(config))
    Path(config["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
