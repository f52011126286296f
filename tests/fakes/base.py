"""Shared machinery for loopback fake providers.

Each fake is a Starlette app that records every request it gets and answers from a script of
faults (``fake.fail_next(Fault.status(503))``) before falling back to its normal, provider-shaped
reply. ``serve(app)`` runs it under uvicorn on 127.0.0.1 in a thread, with TLS when asked
(Ably's SDK refuses keys over plain HTTP).

Fakes of providers that dedupe by idempotency key keep each key for ``window`` seconds from the
request that first used it (the real provider's window by default), measured on ``clock`` (wall
time by default). ``advance(seconds)`` moves a fake's clock forward, so a test can step past a
24 hour window without sleeping; a key seen again after its window creates a new notification, as
the real provider would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour: a status (with headers/body), a hang, or a dropped connection."""

    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    hang_seconds: float = 0.0

    @classmethod
    def http(cls, status: int, body: Any = None, **headers: str) -> Fault:
        return cls(status=status, body=body if body is not None else {"error": f"scripted {status}"}, headers=headers)

    @classmethod
    def rate_limited(cls, retry_after: int = 1, body: Any = None) -> Fault:
        return cls(
            status=429,
            body=body if body is not None else {"error": "rate limited"},
            headers={"Retry-After": str(retry_after)},
        )

    @classmethod
    def hang(cls, seconds: float) -> Fault:
        return cls(status=200, hang_seconds=seconds)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """The usual answer, ``seconds`` late."""
        return cls(status=0, hang_seconds=seconds)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


class FakeProvider:
    """Base for fakes: a request log, a queue of faults consumed one per request, and a dedupe window.

    ``window`` is how long (seconds) an idempotency key is remembered from its first use (None:
    forever); each fake defaults it to its provider's. ``clock`` returns the fake's time in seconds;
    replace it, or ``advance`` it.
    """

    def __init__(self, *, window: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self.window = window
        self.clock = clock

    def advance(self, seconds: float) -> None:
        """Move this fake's clock ``seconds`` forward (keys stored earlier age by as much)."""
        clock = self.clock
        self.clock = lambda: clock() + seconds

    def remembers(self, first_used: float) -> bool:
        """Whether a key first used at ``first_used`` (on ``clock``) is still inside the dedupe window."""
        return self.window is None or self.clock() - first_used < self.window

    def fail_next(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def fail_always(self, fault: Fault, times: int = 10_000) -> None:
        with self._lock:
            self._faults.extend([fault] * times)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    async def record(self, request: Request) -> RecordedRequest:
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.body(),
            query=request.url.query,
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    async def scripted_fault(self) -> Response | None:
        """Pop the next fault and return its response (after hanging), or None to answer normally."""
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is None:
            return None
        if fault.hang_seconds:
            await asyncio.sleep(fault.hang_seconds)
        if fault.status == 0:  # a delay: answered as usual
            return None
        if isinstance(fault.body, str | bytes):
            return Response(fault.body, status_code=fault.status, headers=fault.headers)
        return JSONResponse(fault.body, status_code=fault.status, headers=fault.headers)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_url() -> str:
    """An http URL on loopback where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


@dataclass
class Served:
    url: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread


@contextlib.contextmanager
def serve(
    app: Any, *, tls: tuple[Path, Path] | None = None, port: int | None = None, lifespan: str = "off"
) -> Iterator[Served]:
    """Run ``app`` on 127.0.0.1 in a background thread; yield its base URL; stop it (and its lifespan) on exit."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan=lifespan,
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    scheme = "https" if tls else "http"
    try:
        yield Served(url=f"{scheme}://127.0.0.1:{port}", port=port, server=server, thread=thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a throwaway certificate for 127.0.0.1 (and localhost); return (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
