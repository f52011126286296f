"""Lean loopback fake providers for the benchmark, run in their own process (``python -m bench.providers``).

One bare ASGI app (no framework: the fake must cost as little CPU as possible) speaks just enough of
each provider for the official SDKs to be satisfied, dedupes by idempotency key as the providers do,
and records the wall-clock receipt time (ns) of the first request per key. A call may carry one
delivery or a send group (several deliveries of one event and channel in one call):

* OneSignal ``POST /notifications`` -- key: the body's ``idempotency_key`` (a UUID derived from the
  delivery id, or from the send group's id for a group, whose ``include_aliases.external_id`` names
  every member); one notification id per key, which a repeat replays.
* Knock ``POST /v1/workflows/{key}/trigger`` -- key: the ``Idempotency-Key`` header (the delivery id,
  or the send group's id, whose ``recipients`` name every member); one ``workflow_run_id`` per key.
* Ably ``POST /channels/{name}/messages`` (one message or a list) and the batch publish ``POST
  /messages`` (one spec or a list of ``{"channels", "messages"}``) -- key: each message's ``id`` (the
  delivery id), deduplicated per channel as Ably does; presence ``GET /channels/{name}/presence``
  answers the members set with ``POST /__bench/presence`` (nobody by default). Served over TLS (the
  SDK insists).
* ``POST /v1/send/{channel}`` -- the generic endpoint the BullMQ worker posts to; key: ``Idempotency-Key``.

Control: ``GET /__bench/stats`` (requests by kind, keys, replays), ``GET /__bench/receipts`` (``{key:
ns}``), ``GET /__bench/members`` (``{key: [recipient ids]}`` of the calls that named more than one
recipient), ``POST /__bench/presence`` (``{channel: [client ids]}``, merged; kept across resets),
``POST /__bench/reset`` (forgets receipts and counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvicorn

JSON_HEADERS = [(b"content-type", b"application/json")]
# The request kinds that carry deliveries (provider calls); presence lookups are counted apart.
SEND_KINDS = ("onesignal", "knock", "ably", "ably_batch", "send")


class Receipts:
    """What the fakes were sent since the last reset."""

    def __init__(self) -> None:
        self.first: dict[str, int] = {}
        self.members: dict[str, list[str]] = {}
        self.seen: set[tuple[str, str]] = set()
        self.calls: Counter[str] = Counter()
        self.requests = 0
        self.replays = 0

    def note(self, key: str, *, scope: str = "", members: list[str] | None = None) -> bool:
        """Record ``key`` (deduplicated within ``scope``, e.g. an Ably channel); return True for a replay.

        ``members``: the recipients the call named, kept for the first call with the key when it named several.
        """
        self.requests += 1
        if (scope, key) in self.seen:
            self.replays += 1
            return True
        self.seen.add((scope, key))
        self.first.setdefault(key, time.time_ns())
        if members is not None and len(members) > 1:
            self.members.setdefault(key, members)
        return False

    def stats(self) -> dict[str, Any]:
        sends = sum(self.calls[kind] for kind in SEND_KINDS)
        return {
            "unique": len(self.first),
            "requests": self.requests,
            "replays": self.replays,
            "calls": sends,
            "calls_by_kind": dict(self.calls),
        }


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


def _recipient_ids(recipients: Any) -> list[str]:
    """Knock's ``recipients``: user id strings or inline users ``{"id": ...}``."""
    return [str(r["id"] if isinstance(r, dict) else r) for r in recipients or []]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def ably_batch(receipts: Receipts, body: Any, *, version: int) -> Any:
    """Note every (channel, message) of a batch publish; return Ably's answer (one result per spec)."""
    results: list[Any] = []
    for spec in _as_list(body):
        channels, messages = _as_list(spec.get("channels")), _as_list(spec.get("messages"))
        per_channel = []
        for channel in channels:
            for message in messages:
                receipts.note(str(message.get("id") or ""), scope=str(channel))
            serials = [f"s-{channel}-{message.get('id')}" for message in messages]
            per_channel.append({"channel": channel, "messageId": f"m-{channel}", "serials": serials})
        if version >= 2:
            results.append({"successCount": len(per_channel), "failureCount": 0, "results": per_channel})
        else:  # protocol 1: per spec, the list of per-channel results
            results.append([{"channel": r["channel"], "messageId": r["messageId"]} for r in per_channel])
    return results if isinstance(body, list) else results[0]


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
            receipts.calls["onesignal"] += 1
            body = json.loads(raw)
            key = str(body.get("idempotency_key") or "")
            named = [str(m) for m in (body.get("include_aliases") or {}).get("external_id") or []]
            receipts.note(key, members=named)
            await reply(send, 200, {"id": key, "external_id": None})  # one notification per key, replayed
        elif method == "POST" and path.startswith("/v1/workflows/"):
            receipts.calls["knock"] += 1
            key = _header(scope, b"idempotency-key") or ""
            receipts.note(key, members=_recipient_ids(json.loads(raw).get("recipients")))
            await reply(send, 200, {"workflow_run_id": f"wrun_{key}"})  # one run per key, replayed
        elif method == "POST" and path.startswith("/channels/") and path.endswith("/messages"):
            receipts.calls["ably"] += 1
            channel = path[len("/channels/") : -len("/messages")]
            items = _as_list(json.loads(raw))
            for item in items:
                receipts.note(str(item.get("id") or ""), scope=channel)
            await reply(send, 201, {"serials": [f"s-{channel}-{item.get('id')}" for item in items]})
        elif method == "POST" and path == "/messages":
            receipts.calls["ably_batch"] += 1
            version = int((_header(scope, b"x-ably-version") or "1").split(".")[0] or 1)
            await reply(send, 201, ably_batch(receipts, json.loads(raw), version=version))
        elif method == "GET" and path.startswith("/channels/") and path.endswith("/presence"):
            receipts.calls["ably_presence"] += 1
            channel = path[len("/channels/") : -len("/presence")]
            now = int(time.time() * 1000)
            members = [
                {"id": f"conn{i}:0:0", "clientId": cid, "connectionId": f"conn{i}", "timestamp": now, "action": 1}
                for i, cid in enumerate(present.get(channel, ()))
            ]
            await reply(send, 200, members)
        elif method == "POST" and path.startswith("/v1/send/"):
            receipts.calls["send"] += 1
            key = _header(scope, b"idempotency-key") or ""
            receipts.note(key)
            await reply(send, 200, {"ok": True, "id": f"msg_{key}"})
        elif path == "/__bench/stats":
            await reply(send, 200, receipts.stats())
        elif path == "/__bench/receipts":
            await reply(send, 200, receipts.first)
        elif path == "/__bench/members":
            await reply(send, 200, receipts.members)
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
