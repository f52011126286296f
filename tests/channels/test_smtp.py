"""SmtpEmail driven through real aiosmtplib against a real (aiosmtpd) SMTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiosmtplib
import pytest

from notifier.channels import smtp as smtp_module
from notifier.channels.base import Channel, Message, Outcome, Recipient, SendResult
from notifier.channels.smtp import SmtpEmail, classify_smtp_error
from notifier.config import Settings
from notifier.types import ChannelName, Reason
from tests.fakes.smtp import SmtpFault, SmtpServer

SENDER = "Notifier Ünd Co <noreply@notifier.test>"


def make_message(*, delivery_id: uuid.UUID | None = None, **overrides: Any) -> Message:
    fields: dict[str, Any] = {
        "delivery_id": delivery_id or uuid.uuid4(),
        "event_id": uuid.uuid4(),
        "event_type": "booking.confirmed",
        "channel": ChannelName.email,
        "recipient": Recipient("user-42", "zoe@example.com", "Zoë Ñandú, PhD"),
        "title": "Réservation confirmée ✓",
        "body": "Bonjour Zoë,\nà vendredi.",
        "html": "<p>Bonjour Zoë, <b>à vendredi</b>.</p>",
    }
    fields.update(overrides)
    return Message(**fields)


def channel_for(port: int, **overrides: Any) -> SmtpEmail:
    options: dict[str, Any] = {"host": "127.0.0.1", "port": port, "sender": SENDER, "starttls": False, "timeout": 2.0}
    options.update(overrides)
    return SmtpEmail(**options)


@pytest.fixture
async def smtp(smtp_server: SmtpServer) -> AsyncIterator[SmtpEmail]:
    channel = channel_for(smtp_server.port)
    yield channel
    await channel.aclose()


async def test_is_a_channel(smtp: SmtpEmail) -> None:
    assert isinstance(smtp, Channel)
    assert (smtp.channel, smtp.provider, smtp.needs_email) == (ChannelName.email, "smtp", True)


async def test_multipart_message_arrives_intact(smtp: SmtpEmail, smtp_server: SmtpServer) -> None:
    message = make_message()
    result = await smtp.send(message)

    message_id = f"<{message.delivery_id}@notifier.test>"
    assert result == SendResult.sent(message_id, detail="2.0.0 Message accepted for delivery")
    [received] = smtp_server.messages
    [envelope] = smtp_server.envelopes
    assert (envelope.mail_from, envelope.rcpt_tos) == ("noreply@notifier.test", ["zoe@example.com"])
    assert received["Subject"] == "Réservation confirmée ✓"
    [to] = received["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Zoë Ñandú, PhD", "zoe@example.com")
    [sender] = received["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Notifier Ünd Co", "noreply@notifier.test")
    assert received["Message-ID"] == message_id
    assert received["X-Notifier-Delivery-Id"] == str(message.delivery_id)
    assert received["Auto-Submitted"] == "auto-generated"
    assert received["Date"] is not None
    assert received.get_content_type() == "multipart/alternative"
    text, html = received.iter_parts()
    assert (text.get_content_type(), text.get_content()) == ("text/plain", "Bonjour Zoë,\nà vendredi.\n")
    assert (html.get_content_type(), html.get_content()) == ("text/html", "<p>Bonjour Zoë, <b>à vendredi</b>.</p>\n")
    assert text.get_content_charset() == html.get_content_charset() == "utf-8"


async def test_headers_travel_rfc2047_encoded(smtp: SmtpEmail, smtp_server: SmtpServer) -> None:
    await smtp.send(make_message())
    raw_headers = smtp_server.raw[0].split(b"\r\n\r\n", 1)[0]
    assert raw_headers.isascii()
    assert b"=?utf-8?" in raw_headers


async def test_text_only_message_is_not_multipart(smtp: SmtpEmail, smtp_server: SmtpServer) -> None:
    assert (await smtp.send(make_message(html=None, recipient=Recipient("u", "a@example.com")))).outcome is Outcome.sent
    [received] = smtp_server.messages
    assert received.get_content_type() == "text/plain"
    assert received["To"] == "a@example.com"


async def test_message_id_is_deterministic_per_delivery(smtp: SmtpEmail, smtp_server: SmtpServer) -> None:
    delivery_id = uuid.uuid4()
    first = await smtp.send(make_message(delivery_id=delivery_id))
    again = await smtp.send(make_message(delivery_id=delivery_id))
    other = await smtp.send(make_message())
    ids = [m["Message-ID"] for m in smtp_server.messages]
    assert (
        ids[0] == ids[1] == first.provider_message_id == again.provider_message_id == f"<{delivery_id}@notifier.test>"
    )
    assert ids[2] == other.provider_message_id != ids[0]


async def test_reply_lost_after_data_is_retried_and_delivers_twice_with_the_same_message_id(
    smtp: SmtpEmail, smtp_server: SmtpServer
) -> None:
    # The documented at-least-once boundary for SMTP: a server that kept the message but whose 250
    # never arrived is indistinguishable, to the client, from one that lost it, and SMTP has no
    # idempotency key, so the retry is delivered again. notifier only makes the copies recognisable
    # (same Message-ID, <delivery-id@domain>) for a receiver that dedupes.
    delivery_id = uuid.uuid4()
    smtp_server.fail_next(SmtpFault.reply_lost())
    first = await smtp.send(make_message(delivery_id=delivery_id))
    assert (first.outcome, first.reason) == (Outcome.retry, None)
    assert "SMTPServerDisconnected" in first.detail
    assert len(smtp_server.messages) == 1  # accepted before the connection dropped

    retry = await smtp.send(make_message(delivery_id=delivery_id))
    message_id = f"<{delivery_id}@notifier.test>"
    assert retry == SendResult.sent(message_id, detail="2.0.0 Message accepted for delivery")
    assert [m["Message-ID"] for m in smtp_server.messages] == [message_id, message_id]
    assert [m["X-Notifier-Delivery-Id"] for m in smtp_server.messages] == [str(delivery_id)] * 2


@pytest.mark.parametrize(
    "overrides",
    [
        {"title": "Hello\r\nBcc: victim@example.org"},
        {"title": "Hello\nX-Evil: 1"},
        {"recipient": Recipient("u", "zoe@example.com", "Zoë\r\nBcc: victim@example.org")},
        {"recipient": Recipient("u", "zoe@example.com\r\nBcc: victim@example.org")},
        {"recipient": Recipient("u", "zoe@example.com, victim@example.org")},
        {"recipient": Recipient("u", "not an address")},
        {"recipient": Recipient("u", None)},
        # Line breaks other than CR/LF, which Python's email package refuses in any header (str.splitlines)
        {"title": "Hello\u2028there"},
        {"title": "Hello\x85there"},
        {"title": "Hello\x0bthere"},
        {"title": "Hello\x1cthere"},
        {"recipient": Recipient("u", "zoe@example.com", "Zoë\u2029Bcc")},
    ],
    ids=[
        "title CRLF",
        "title LF",
        "name CRLF",
        "email CRLF",
        "two addresses",
        "not an address",
        "no email",
        "title U+2028",
        "title U+0085",
        "title VT",
        "title FS",
        "name U+2029",
    ],
)
async def test_unsafe_headers_are_refused_without_sending(
    overrides: dict[str, Any], smtp: SmtpEmail, smtp_server: SmtpServer
) -> None:
    result = await smtp.send(make_message(**overrides))
    assert (result.outcome, result.reason) == (Outcome.failed, Reason.rejected)
    assert smtp_server.sessions == 0
    assert smtp_server.messages == []


async def test_any_header_the_email_package_refuses_fails_for_good(
    smtp: SmtpEmail, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ValueError while composing is a property of the message, not of the moment: a retry would fail alike.
    def refuse(message: Message, *, sender: str) -> None:
        raise ValueError("Header values may not contain linefeed or carriage return characters")

    monkeypatch.setattr(smtp_module, "compose", refuse)
    result = await smtp.send(make_message())
    assert (result.outcome, result.reason) == (Outcome.failed, Reason.rejected)
    assert result.detail == "ValueError: Header values may not contain linefeed or carriage return characters"
    assert smtp_server.sessions == 0


async def test_unsafe_sender_is_refused(smtp_server: SmtpServer) -> None:
    channel = channel_for(smtp_server.port, sender="noreply@notifier.test\r\nBcc: victim@example.org")
    assert (await channel.send(make_message())).reason is Reason.rejected
    assert smtp_server.sessions == 0


TABLE = {
    "451 at RCPT (greylisting)": (SmtpFault.temporary("rcpt"), Outcome.retry, "451 4.7.1"),
    "452 at RCPT": (SmtpFault("rcpt", "452 4.2.2 Mailbox full"), Outcome.retry, "452"),
    "451 at DATA": (SmtpFault.temporary("data"), Outcome.retry, "451"),
    "421 at MAIL": (SmtpFault("mail", "421 4.3.2 Shutting down"), Outcome.retry, "421"),
    "550 at RCPT": (SmtpFault.permanent("rcpt"), Outcome.failed, "550 5.1.1"),
    "550 at DATA": (SmtpFault.permanent("data"), Outcome.failed, "550"),
    "553 at MAIL": (SmtpFault("mail", "553 5.7.1 Sender not allowed"), Outcome.failed, "553"),
}


@pytest.mark.parametrize(("fault", "outcome", "detail"), TABLE.values(), ids=TABLE.keys())
async def test_reply_table(
    fault: SmtpFault, outcome: Outcome, detail: str, smtp: SmtpEmail, smtp_server: SmtpServer
) -> None:
    smtp_server.fail_next(fault)
    result = await smtp.send(make_message())
    assert result.outcome is outcome
    assert result.reason is (Reason.rejected if outcome is Outcome.failed else None)
    assert detail in result.detail
    assert smtp_server.messages == []
    assert (await smtp.send(make_message())).outcome is Outcome.sent  # the fault was one reply only


async def test_absent_server_is_retried(smtp: SmtpEmail, smtp_server: SmtpServer) -> None:
    smtp_server.stop()
    result = await smtp.send(make_message())
    assert result.outcome is Outcome.retry
    assert "SMTPConnectError" in result.detail


async def test_silent_server_times_out_and_is_retried() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await channel_for(server.sockets[0].getsockname()[1], timeout=0.5).send(make_message())
    elapsed = loop.time() - started
    for writer in writers:
        writer.close()
        await writer.wait_closed()
    server.close()
    await server.wait_closed()
    assert writers, "the client never connected"
    assert result.outcome is Outcome.retry
    assert "Timeout" in result.detail
    assert 0.5 <= elapsed < 1.5


async def test_starttls_required_but_not_offered_is_retried(smtp_server: SmtpServer) -> None:
    result = await channel_for(smtp_server.port, starttls=True).send(make_message())
    assert result.outcome is Outcome.retry
    assert "STARTTLS" in result.detail
    assert smtp_server.messages == []


@pytest.mark.parametrize(("password", "outcome"), [("s3cret-pw", Outcome.sent), ("wrong", Outcome.failed)])
async def test_login_when_username_is_set(password: str, outcome: Outcome) -> None:
    server = SmtpServer(credentials=("mailer", "s3cret-pw"))
    server.start()
    try:
        result = await channel_for(server.port, username="mailer", password=password).send(make_message())
    finally:
        server.stop()
    assert result.outcome is outcome
    assert server.logins == (["mailer"] if outcome is Outcome.sent else [])
    assert len(server.messages) == (1 if outcome is Outcome.sent else 0)
    if outcome is Outcome.failed:
        assert "535" in result.detail


def _refused(*codes: int) -> aiosmtplib.SMTPRecipientsRefused:
    return aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(c, "no", "x@example.com") for c in codes])


E = aiosmtplib
# Every exception class aiosmtplib exports (4xx and 5xx variants of the reply-carrying ones).
SMTP_ERRORS: list[tuple[Exception, Outcome]] = [
    (E.SMTPException("odd"), Outcome.retry),
    (E.SMTPNotSupported("no STARTTLS"), Outcome.retry),
    (E.SMTPServerDisconnected("gone"), Outcome.retry),
    (E.SMTPConnectError("refused"), Outcome.retry),
    (E.SMTPTimeoutError("slow"), Outcome.retry),
    (E.SMTPConnectTimeoutError("slow"), Outcome.retry),
    (E.SMTPReadTimeoutError("slow"), Outcome.retry),
    (E.SMTPResponseException(451, "later"), Outcome.retry),
    (E.SMTPResponseException(554, "no"), Outcome.failed),
    (E.SMTPConnectResponseError(421, "busy"), Outcome.retry),
    (E.SMTPConnectResponseError(554, "go away"), Outcome.failed),
    (E.SMTPHeloError(421, "busy"), Outcome.retry),
    (E.SMTPHeloError(501, "bad name"), Outcome.failed),
    (E.SMTPAuthenticationError(454, "try later"), Outcome.retry),
    (E.SMTPAuthenticationError(535, "bad credentials"), Outcome.failed),
    (E.SMTPSenderRefused(451, "later", "a@example.com"), Outcome.retry),
    (E.SMTPSenderRefused(553, "not allowed", "a@example.com"), Outcome.failed),
    (E.SMTPRecipientRefused(450, "busy", "x@example.com"), Outcome.retry),
    (E.SMTPRecipientRefused(550, "unknown", "x@example.com"), Outcome.failed),
    (_refused(550, 551), Outcome.failed),
    (_refused(550, 451), Outcome.retry),
    (E.SMTPDataError(452, "full"), Outcome.retry),
    (E.SMTPDataError(554, "spam"), Outcome.failed),
    (OSError("network down"), Outcome.retry),
    (ValueError("odd"), Outcome.retry),
]


def test_smtp_mapping_is_complete() -> None:
    exported = {getattr(aiosmtplib.errors, name) for name in aiosmtplib.errors.__all__}
    assert exported <= {type(exc) for exc, _ in SMTP_ERRORS}, "an aiosmtplib exception class has no expected outcome"
    for exc, outcome in SMTP_ERRORS:
        result = classify_smtp_error(exc)
        assert (result.outcome, result.reason) == (outcome, Reason.rejected if outcome is Outcome.failed else None), exc
        assert result.detail, exc
    assert "ValueError" in classify_smtp_error(ValueError("odd")).detail


def test_from_settings() -> None:
    assert SmtpEmail.from_settings(Settings(smtp_host=None, smtp_from="a@example.com")) is None
    assert SmtpEmail.from_settings(Settings(smtp_host="127.0.0.1", smtp_from=None)) is None
    channel = SmtpEmail.from_settings(
        Settings(smtp_host="127.0.0.1", smtp_from=SENDER, smtp_username="u", smtp_password="pw-123456")
    )
    assert isinstance(channel, SmtpEmail)
    assert "pw-123456" not in repr(channel)
    with pytest.raises(ValueError, match="SMTP_FROM"):
        SmtpEmail.from_settings(Settings(smtp_host="127.0.0.1", smtp_from="Notifier"))


async def test_from_settings_channel_sends(smtp_server: SmtpServer) -> None:
    settings = Settings(smtp_host="127.0.0.1", smtp_port=smtp_server.port, smtp_from=SENDER, smtp_starttls=False)
    channel = SmtpEmail.from_settings(settings)
    assert channel is not None
    assert (await channel.send(make_message())).outcome is Outcome.sent
    assert len(smtp_server.messages) == 1
