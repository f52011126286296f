"""A real SMTP server on 127.0.0.1 (aiosmtpd) that keeps what it receives and can be told to refuse.

``smtp_server.messages`` holds each accepted message parsed as an ``EmailMessage``, ``raw`` its
bytes as received, ``envelopes`` its SMTP envelope (MAIL FROM, RCPT TO); ``sessions`` counts
EHLO/HELO greetings, i.e. clients that got as far as talking SMTP. Script replies with
``fail_next(SmtpFault.temporary("rcpt"))`` (451), ``SmtpFault.permanent("data")`` (550) or any
reply line; a fault is consumed by the next command of its stage. ``SmtpFault.reply_lost()`` makes
the next DATA *succeed* (the message is kept) but closes the connection instead of answering 250,
as when a server's reply is lost on the way back. ``stop()`` makes the server absent, so
connections to ``port`` are refused.

aiosmtpd 1.4 emits ``warnings.warn`` only for deprecated handler hooks and for ``auth_required``
without TLS; this fake uses neither, so it runs clean under ``filterwarnings = error``. (With
credentials, aiosmtpd *logs* a "login_data is deprecated" warning on every AUTH; that is a log
record, not a Python warning.)
"""

from __future__ import annotations

import email.policy
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Literal

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from tests.fakes.base import free_port

Stage = Literal["mail", "rcpt", "data"]


@dataclass(frozen=True)
class SmtpFault:
    """A scripted reply line for the next MAIL, RCPT or DATA command.

    With ``lost`` (DATA only) the message is kept as delivered and ``reply`` is what the server meant
    to answer, but the connection is closed instead, so the client never reads it.
    """

    stage: Stage
    reply: str
    lost: bool = False

    @classmethod
    def temporary(cls, stage: Stage = "rcpt") -> SmtpFault:
        return cls(stage, "451 4.7.1 Greylisted, please try again later")

    @classmethod
    def permanent(cls, stage: Stage = "rcpt") -> SmtpFault:
        return cls(stage, "550 5.1.1 Mailbox unavailable")

    @classmethod
    def accepted(cls) -> SmtpFault:
        """Accept the next DATA as usual: a place holder that lets a later fault hit a later message."""
        return cls("data", "250 2.0.0 Message accepted for delivery")

    @classmethod
    def reply_lost(cls) -> SmtpFault:
        """Accept the next DATA (keep the message), then drop the connection without answering 250."""
        return cls("data", "250 2.0.0 Message accepted for delivery", lost=True)


class _TrackedSMTP(SMTP):
    """aiosmtpd's protocol, reporting which connections are open so ``stop()`` can close them."""

    def __init__(self, handler: SmtpServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = handler

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        with self._owner._lock:
            self._owner._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        with self._owner._lock:
            self._owner._live.discard(self)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _TrackedSMTP(self.handler, **self.SMTP_kwargs)


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    rcpt_tos: list[str]


class SmtpServer:
    """aiosmtpd handler plus controller; ``start()`` binds a free port on 127.0.0.1."""

    def __init__(self, *, credentials: tuple[str, str] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.messages: list[EmailMessage] = []
        self.raw: list[bytes] = []
        self.sessions = 0
        self.envelopes: list[Envelope] = []
        self.logins: list[str] = []
        self._credentials = credentials
        self._faults: deque[SmtpFault] = deque()
        self._lock = threading.Lock()
        self._live: set[_TrackedSMTP] = set()
        kwargs: dict[str, Any] = {}
        if credentials is not None:
            # AUTH is offered over plain TCP only when TLS is not demanded; loopback tests only.
            kwargs = {"authenticator": self._authenticate, "auth_require_tls": False}
        self._controller = _Controller(self, hostname=self.host, port=self.port, **kwargs)
        self._running = False

    def start(self) -> None:
        self._controller.start()
        self._running = True

    def stop(self) -> None:
        """Stop listening (idempotent): later connections to ``port`` are refused.

        Open connections are closed first: ``Controller.stop()`` only cancels tasks and stops its
        loop, which leaves their sockets to the garbage collector (a ResourceWarning, an error here).
        """
        if not self._running:
            return
        self._running = False
        with self._lock:
            live = list(self._live)
        for protocol in live:
            if protocol.transport is not None:
                self._controller.loop.call_soon_threadsafe(protocol.transport.close)
        deadline = time.monotonic() + 5
        while self._live and time.monotonic() < deadline:
            time.sleep(0.01)
        self._controller.stop()

    def fail_next(self, *faults: SmtpFault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _scripted(self, stage: Stage) -> SmtpFault | None:
        with self._lock:
            if self._faults and self._faults[0].stage == stage:
                return self._faults.popleft()
        return None

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and self._credentials == (
            auth_data.login.decode(),
            auth_data.password.decode(),
        )
        if ok:
            self.logins.append(auth_data.login.decode())
        # handled=False: let aiosmtpd answer 535 itself (the default, handled=True, answers nothing).
        return AuthResult(success=ok, handled=False)

    # aiosmtpd handler hooks (found by name on the handler object).

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        with self._lock:
            self.sessions += 1
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        # The 5-argument form (the 4-argument one is deprecated and warns); it must set host_name itself.
        with self._lock:
            self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]) -> str:
        fault = self._scripted("mail")
        if fault is not None:
            return fault.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]) -> str:
        fault = self._scripted("rcpt")
        if fault is not None:
            return fault.reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        fault = self._scripted("data")
        if fault is not None and not fault.lost and not fault.reply.startswith("2"):
            return fault.reply
        # Wire line endings are CRLF; parse with \n, as a mail store does, so bodies compare as text.
        parsed = BytesParser(policy=email.policy.default).parsebytes(envelope.original_content.replace(b"\r\n", b"\n"))
        assert isinstance(parsed, EmailMessage)
        with self._lock:
            self.messages.append(parsed)
            self.raw.append(envelope.original_content)
            self.envelopes.append(Envelope(envelope.mail_from, list(envelope.rcpt_tos)))
        if fault is not None and fault.lost:
            # Accepted, but the reply never arrives: close now. aiosmtpd then writes ``fault.reply`` to
            # the closing transport, which discards it, and connection_lost cancels this session.
            server.transport.close()
            return fault.reply
        return "250 2.0.0 Message accepted for delivery"


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A running SMTP server on 127.0.0.1 without TLS or AUTH (use SMTP_STARTTLS=false against it)."""
    server = SmtpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
