"""Lean loopback fake providers for the benchmark, run in their own process (``python -m bench.providers``).

One bare ASGI app (no framework: the fake must cost as little CPU as possible) speaks just enough of
each provider for the official SDKs to be satisfied, dedupes by idempotency key as the providers do,
and records the wall-clock receipt time (ns) of the first request per key:

* OneSignal ``POST /notifications`` -- key: the body's ``idempotency_key`` (a UUID derived from the
  delivery id); a repeat replays the same notification id.
* Knock ``POST /v1/workflows/{key}/trigger`` -- key: the ``Idempotency-Key`` header (the delivery id).
* Ably ``POST /channels/{name}/messages`` -- key: each message's ``id`` (the delivery id); presence
  ``GET /channels/{name}/presence`` answers the members set with ``POST /__bench/presence`` (nobody by
  default). Served over TLS (the SDK insists).
* ``POST /v1/send/{channel}`` -- the generic endpoint the BullMQ worker posts to; key: ``Idempotency-Key``.

Control: ``GET /__bench/stats``, ``GET /__bench/receipts`` (``{key: ns}``), ``POST /__bench/presence``
(``{channel: [client ids]}``, merged; kept across resets), ``POST /__bench/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import uvicorn

JSON_HEADERS = [(b"content-type", b"application/json")]


class Receipts:
    def __init__(self) -> None:
        self.first: dict[str, int] = {}
        self.requests = 0
        self.replays = 0

    def note(self, key: str) -> bool:
        """Record ``key``; return True if it was seen before (a replay)."""
        self.requests += 1
        if key in self.first:
            self.replays += 1
            return True
        self.first[key] = time.time_ns()
        return False


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def make_app(receipts: Receipts, present: dict[str, list[str]] | None = None) -> Any:
    present = {} if present is None else present

    async def reply(send: Any, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        headers = [*JSON_HEADERS, (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        raw = await _body(receive)
        if method == "POST" and path == "/notifications":
            key = str(json.loads(raw).get("idempotency_key") or "")
            receipts.note(key)
            await reply(send, 200, {"id": key, "external_id": None})
        elif method == "POST" and path.startswith("/v1/workflows/"):
            key = _header(scope, b"idempotency-key") or ""
            receipts.note(key)
            await reply(send, 200, {"workflow_run_id": f"wrun_{key}"})
        elif method == "POST" and path.startswith("/channels/") and path.endswith("/messages"):
            body = json.loads(raw)
            items = body if isinstance(body, list) else [body]
            for item in items:
                receipts.note(str(item.get("id") or ""))
            await reply(send, 201, {"serials": [f"s-{item.get('id')}" for item in items]})
        elif method == "GET" and path.startswith("/channels/") and path.endswith("/presence"):
            channel = path[len("/channels/") : -len("/presence")]
            now = int(time.time() * 1000)
            members = [
                {"id": f"conn{i}:0:0", "clientId": cid, "connectionId": f"conn{i}", "timestamp": now, "action": 1}
                for i, cid in enumerate(present.get(channel, ()))
            ]
            await reply(send, 200, members)
        elif method == "POST" and path.startswith("/v1/send/"):
            receipts.note(_header(scope, b"idempotency-key") or "")
            await reply(send, 200, {"ok": True})
        elif path == "/__bench/stats":
            await reply(
                send, 200, {"unique": len(receipts.first), "requests": receipts.requests, "replays": receipts.replays}
            )
        elif path == "/__bench/receipts":
            await reply(send, 200, receipts.first)
        elif path == "/__bench/presence" and method == "POST":
            present.update({str(k): [str(c) for c in v] for k, v in json.loads(raw).items()})
            await reply(send, 200, {"channels": len(present)})
        elif path == "/__bench/reset" and method == "POST":
            receipts.__init__()  # type: ignore[misc]
            await reply(send, 200, {"ok": True})
        else:
            await reply(send, 404, {"error": f"no route {method} {path}"})

    return app


async def serve(http_port: int, https_port: int, cert: Path, key: Path) -> None:
    app = make_app(Receipts())
    common: dict[str, Any] = {"host": "127.0.0.1", "log_level": "warning", "access_log": False, "lifespan": "off"}
    plain = uvicorn.Server(uvicorn.Config(app, port=http_port, **common))
    tls = uvicorn.Server(uvicorn.Config(app, port=https_port, ssl_certfile=str(cert), ssl_keyfile=str(key), **common))
    await asyncio.gather(plain.serve(), tls.serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--https-port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.http_port, args.https_port, args.cert, args.key))
    except ImportError:
        asyncio.run(serve(args.http_port, args.https_port, args.cert, args.key))


if __name__ == "__main__":
    main()
