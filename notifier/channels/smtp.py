"""Email over SMTP with ``aiosmtplib``: one connection and one transaction per send.

The ``Message-ID`` is derived from the delivery id (``<delivery-id@from-domain>``), so a message
re-sent after an ambiguous failure (the server took DATA but the connection dropped before it
answered) is recognisable as the same message by the recipient's mail system and by support.

Classification, all in ``classify_smtp_error``: only a definite 5xx answer is permanent.

- 250 after DATA → sent(Message-ID)
- a 5xx reply (``SMTPResponseException``: greeting, HELO, AUTH, MAIL, RCPT, DATA) → failed(rejected)
- ``SMTPRecipientsRefused`` → failed(rejected) when every code is 5xx, else retry (450/451 at RCPT
  is usually greylisting)
- a 4xx reply (421, 450, 451, 452, ...) → retry
- connect error, timeout, ``SMTPServerDisconnected`` → retry
- any other ``SMTPException`` (e.g. STARTTLS or AUTH not offered), ``OSError``, anything
  unexpected → retry, exception class named in detail
- a line break in a header value (CR, LF or any other ``str.splitlines`` boundary: U+2028, U+0085, \\x0b, ...),
  an address that does not parse, anything else the email package refuses (``ValueError``)
  → failed(rejected), nothing sent: the message is the same on every retry
"""

from __future__ import annotations

import datetime as dt
import email.utils
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from typing import TYPE_CHECKING, ClassVar

import aiosmtplib

from notifier.channels.base import Message, MessageGroup, SendResult
from notifier.channels.edge import finish
from notifier.types import ChannelName, Reason, line_break_in

if TYPE_CHECKING:
    from notifier.config import Settings

IMPLICIT_TLS_PORT = 465  # SMTPS: TLS from the first byte, not STARTTLS


class UnsafeHeader(ValueError):
    """Raised by ``compose`` when a header value would inject headers (CR/LF) or is not an address."""


def _reply(code: int, text: str) -> str:
    return f"{code} {text}".strip()


def classify_smtp_error(exc: Exception) -> SendResult:
    """Translate anything ``aiosmtplib.send`` raised into a SendResult (never raises)."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        detail = "recipient refused: " + "; ".join(_reply(r.code, r.message) for r in exc.recipients)
        if exc.recipients and all(500 <= r.code < 600 for r in exc.recipients):
            return SendResult.failed(Reason.rejected, detail)
        return SendResult.retry(detail)  # 450/451 at RCPT is usually greylisting: come back later
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        detail = f"{type(exc).__name__}: {_reply(exc.code, exc.message)}"
        if 500 <= exc.code < 600:
            return SendResult.failed(Reason.rejected, detail)
        return SendResult.retry(detail)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected):
        return SendResult.retry(f"{type(exc).__name__}: {exc}")
    return SendResult.retry(f"unexpected {type(exc).__name__}: {exc}")


def _checked(name: str, value: str) -> str:
    if (found := line_break_in(value)) is not None:
        raise UnsafeHeader(f"{name} contains a line break (U+{ord(found):04X}): {value!r}")
    return value


def message_id_for(message: Message, sender: str) -> str:
    """Return the deterministic Message-ID for a delivery, in the From address's domain."""
    domain = email.utils.parseaddr(sender)[1].rpartition("@")[2] or "notifier"
    return f"<{message.delivery_id}@{domain}>"


def compose(message: Message, *, sender: str) -> EmailMessage:
    """Return the MIME message: text/plain, or multipart/alternative with an HTML part when given.

    Raises ``UnsafeHeader`` for a line break in any header value or an address that does not parse, and
    ``ValueError`` for anything else the email package refuses.
    """
    recipient = message.recipient
    if not recipient.email:
        raise UnsafeHeader(f"recipient {recipient.id!r} has no email address")
    try:
        to = Address(
            display_name=_checked("recipient name", recipient.name or ""),
            addr_spec=_checked("recipient email", recipient.email),
        )
    except (ValueError, HeaderParseError) as exc:
        raise UnsafeHeader(f"recipient email {recipient.email!r} is not an address: {exc}") from exc
    mime = EmailMessage()
    mime["From"] = _checked("SMTP_FROM", sender)
    mime["To"] = to
    mime["Subject"] = _checked("title", message.title)
    mime["Date"] = email.utils.formatdate(usegmt=True)
    mime["Message-ID"] = message_id_for(message, sender)
    mime["X-Notifier-Delivery-Id"] = str(message.delivery_id)
    mime["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies to notifications
    mime.set_content(message.body)
    if message.html is not None:
        mime.add_alternative(message.html, subtype="html")
    return mime


class SmtpEmail:
    """The email channel when SMTP is configured (and Knock is not)."""

    channel: ClassVar[ChannelName] = ChannelName.email
    provider: ClassVar[str] = "smtp"
    needs_email: ClassVar[bool] = True
    group_limit: ClassVar[int] = 100  # messages sent over one connection
    # The server keeps no key: a resend is a second copy, recognisable only by its Message-ID.
    dedupe_window: ClassVar[dt.timedelta | None] = None

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        timeout: float,
    ) -> None:
        self._envelope_from = email.utils.parseaddr(sender)[1]
        if "@" not in self._envelope_from:
            raise ValueError(f"SMTP_FROM {sender!r} has no email address")
        self._host = host
        self._port = port
        self._sender = sender
        self._username = username or None
        self._password = password
        self._starttls = starttls
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"SmtpEmail(host={self._host!r}, port={self._port}, sender={self._sender!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpEmail | None:
        """Return a channel built from SMTP_* settings, or None without SMTP_HOST or SMTP_FROM."""
        if not settings.smtp_host or not settings.smtp_from:
            return None
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=settings.smtp_from,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password is not None else None,
            starttls=settings.smtp_starttls,
            timeout=settings.provider_timeout_seconds,
        )

    async def send(self, message: Message) -> SendResult:
        """Hand the message to the SMTP server once and classify its answer."""
        [result] = await self.send_group(MessageGroup.alone(message))
        return result

    async def send_group(self, group: MessageGroup) -> list[SendResult]:
        """Send each member its own message (no shared To lines) over one connection; classify each.

        A member whose message cannot be composed, or whom the server refuses, fails alone. Members not yet
        sent when the connection fails share that failure (connecting, or the server hanging up: retry; a 5xx
        greeting or a refused login: failed); their Message-IDs stay the same on the retry.
        """
        results: list[SendResult | None] = [None] * len(group.messages)
        composed: list[tuple[int, Message, EmailMessage]] = []
        for index, message in enumerate(group.messages):
            try:
                composed.append((index, message, compose(message, sender=self._sender)))
            except ValueError as exc:  # UnsafeHeader, or anything else the email package refuses: the same next time
                detail = str(exc) if isinstance(exc, UnsafeHeader) else f"{type(exc).__name__}: {exc}"
                results[index] = SendResult.failed(Reason.rejected, detail)
        unsent = SendResult.retry("not sent: the server closed the connection before this message")
        if composed:
            implicit_tls = self._port == IMPLICIT_TLS_PORT
            client = aiosmtplib.SMTP(
                hostname=self._host,
                port=self._port,
                username=self._username,
                password=self._password if self._username else None,
                use_tls=implicit_tls,
                start_tls=self._starttls and not implicit_tls,
                timeout=self._timeout,
            )
            try:
                async with client:
                    for index, message, mime in composed:
                        results[index] = await self._send_one(client, message, mime)
                        if not client.is_connected:
                            break
            except Exception as exc:  # connecting, or saying goodbye, failed
                unsent = classify_smtp_error(exc)
        return [finish(result or unsent, (self._password or "",)) for result in results]

    async def _send_one(self, client: aiosmtplib.SMTP, message: Message, mime: EmailMessage) -> SendResult:
        try:
            _, reply = await client.send_message(
                mime,
                sender=self._envelope_from,
                recipients=[message.recipient.email or ""],  # compose() checked it is one bare address
            )
        except Exception as exc:  # the one edge where SMTP faults become a SendResult
            return classify_smtp_error(exc)
        return SendResult.sent(message_id_for(message, self._sender), detail=reply)

    async def aclose(self) -> None:
        """Nothing to release: each send (or group) opens and closes its own connection."""
