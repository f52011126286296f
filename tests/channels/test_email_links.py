"""Links in emails: the catalog's relative action URLs (``/approvals/a3``) are made absolute against
NOTIFIER_APP_URL on email (SMTP and Knock), and stay relative in the inbox and in push data, where the product
resolves them. Through the real service, the real aiosmtpd server and the loopback Knock and OneSignal fakes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Service
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.smtp import SmtpServer

APP_URL = "https://app.example.com"
APPROVAL = {"approval_id": "a3", "title": "New boiler", "requested_by_name": "Ann"}
Factory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


def smtp(server: SmtpServer) -> dict[str, Any]:
    return {
        "smtp_host": server.host,
        "smtp_port": server.port,
        "smtp_from": "notify@example.com",
        "smtp_starttls": False,
    }


def approval(*users: str) -> dict[str, Any]:
    people = [{"id": user, "email": f"{user}@example.com", "locale": "en"} for user in users]
    return {"type": "approval.requested", "recipients": people, "data": APPROVAL}


def text_and_html(message: EmailMessage) -> tuple[str, str]:
    parts = {part.get_content_type(): part.get_content() for part in message.walk() if not part.is_multipart()}
    return parts["text/plain"], parts["text/html"]


async def test_an_approval_email_over_smtp_links_to_the_app_and_the_inbox_keeps_the_relative_url(
    service_factory: Factory, smtp_server: SmtpServer, onesignal_fake: OneSignalFake
) -> None:
    push = onesignal_fake.settings()
    async with service_factory(app_url=APP_URL + "/", **smtp(smtp_server), **push) as svc:
        assert (await svc.post_event(approval("u-1"))).status_code == 202
        await svc.drain()
        [item] = (await svc.get("/v1/users/u-1/inbox")).json()["data"]
    [message] = smtp_server.messages
    text, html = text_and_html(message)
    assert "Review it: https://app.example.com/approvals/a3" in text
    assert '<a href="https://app.example.com/approvals/a3">' in html
    # The product resolves these itself: the inbox is its own page, the push app opens the URL in its data.
    assert item["action_url"] == "/approvals/a3"
    [notification] = onesignal_fake.notifications
    assert notification.body["data"]["action_url"] == "/approvals/a3"


async def test_knock_gets_the_absolute_action_url_in_its_data_for_the_whole_send_group(
    service_factory: Factory, knock_fake: KnockFake
) -> None:
    """Knock's workflow builds the email from ``data`` (``{{ data.action_url }}``): it is read in a mail client too."""
    async with service_factory(app_url=APP_URL, knock_api_key=knock_fake.api_key, knock_base_url=knock_fake.url) as svc:
        assert (await svc.post_event(approval("u-1", "u-2"))).status_code == 202
        await svc.drain()
    [trigger] = knock_fake.triggers  # both recipients in one run: the link is the same for everyone
    assert sorted(trigger.recipient_ids) == ["u-1", "u-2"]
    assert trigger.data["action_url"] == "https://app.example.com/approvals/a3"
    assert "Review it: https://app.example.com/approvals/a3" in trigger.data["body"]
    assert 'href="https://app.example.com/approvals/a3"' in trigger.data["html"]
    assert trigger.data["approval_id"] == "a3"  # the event's own data is passed on as it came


async def test_an_action_url_that_is_already_absolute_is_left_alone(
    service_factory: Factory, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        """
[types."article.published"]
category = "articles"
default_channels = ["email"]
required = ["article_id"]
action_url = "https://help.example.com/articles/{{ article_id }}"

[types."article.published".templates.default.en]
title = "New article"
body = "Read it: {{ action_url }}"
html = "<a href=\\"{{ action_url }}\\">Read it</a>"
""",
        encoding="utf-8",
    )
    async with service_factory(app_url=APP_URL + "/shop", catalog_path=catalog, **smtp(smtp_server)) as svc:
        article = {"type": "article.published", "recipients": [{"id": "u-1", "email": "u-1@example.com"}]}
        assert (await svc.post_event({**article, "data": {"article_id": "7"}})).status_code == 202
        assert (await svc.post_event(approval("u-1"))).status_code == 202
        await svc.drain()
    texts = {message["Subject"]: text_and_html(message) for message in smtp_server.messages}
    assert texts["New article"] == (
        "Read it: https://help.example.com/articles/7\n",
        '<a href="https://help.example.com/articles/7">Read it</a>\n',
    )
    # In the same service a relative one is joined, under the app's path (not in place of it, as urljoin would).
    assert "Review it: https://app.example.com/shop/approvals/a3" in texts["Approval requested: New boiler"][0]


def app_url_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "NOTIFIER_APP_URL" in r.message]


async def test_without_an_app_url_emails_keep_relative_links_and_start_up_says_so_once(
    service_factory: Factory, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="notifier")
    async with service_factory():  # no email provider: nothing to warn about
        pass
    assert app_url_warnings(caplog) == []
    async with service_factory(**smtp(smtp_server)) as svc:
        assert (await svc.post_event(approval("u-1"))).status_code == 202
        await svc.drain()
    [warning] = app_url_warnings(caplog)
    assert warning.startswith("NOTIFIER_APP_URL is not set: emails of approval.requested, approval.responded, ")
    assert "(like /approvals/{{ approval_id }}) that a mail client cannot open" in warning
    text, html = text_and_html(smtp_server.messages[0])
    assert "Review it: /approvals/a3" in text  # unchanged
    assert '<a href="/approvals/a3">' in html
    caplog.clear()
    async with service_factory(app_url=APP_URL, **smtp(smtp_server)):
        pass
    assert app_url_warnings(caplog) == []
