"""Send groups end to end: one event's deliveries with the same message on one channel go out as one provider
call, yet every member keeps its own status, reason, attempt rows and transitions.

Run through the real service (local dispatcher) against the loopback fakes, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from notifier.channels.base import IDEMPOTENCY_NAMESPACE, Message, MessageGroup, Outcome, Recipient
from notifier.channels.smtp import SmtpEmail
from notifier.db.models import Delivery, DeliveryAttempt
from notifier.types import ChannelName
from tests.conftest import Service, make_settings, running_service
from tests.fakes.base import Fault
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake
from tests.fakes.smtp import SmtpFault, SmtpServer
from tests.reliability.faults import Late, first, in_front_of, knock_key_of

PAYMENT = {"payment_id": "p-1", "amount": "10", "currency": "EUR", "payer_name": "Ann"}
FIVE = [f"u-{i}" for i in range(5)]


def payment(*recipients: Any, key: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "payment.received", "recipients": list(recipients), "data": PAYMENT}
    if key is not None:
        body["idempotency_key"] = key
    return body


def people(*ids: str) -> list[dict[str, str]]:
    return [{"id": user, "email": f"{user}@example.com", "locale": "en"} for user in ids]


async def rows(svc: Service, channel: str) -> list[Delivery]:
    async with svc.runtime.sessions() as session:
        found = await session.execute(sa.select(Delivery).where(col(Delivery.channel) == channel))
        return sorted(found.scalars(), key=lambda d: d.user_id)


async def attempts(svc: Service, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
    async with svc.runtime.sessions() as session:
        found = await session.execute(
            sa.select(DeliveryAttempt)
            .where(col(DeliveryAttempt.delivery_id) == delivery_id)
            .order_by(col(DeliveryAttempt.number))
        )
        return list(found.scalars())


def push(fake: OneSignalFake) -> dict[str, Any]:
    return {"onesignal_app_id": fake.app_id, "onesignal_rest_api_key": fake.api_key, "onesignal_api_url": fake.url}


def knock(fake: KnockFake, url: str | None = None) -> dict[str, Any]:
    return {"knock_api_key": fake.api_key, "knock_base_url": url or fake.url}


async def test_a_group_of_five_with_one_unknown_alias_is_one_notification_four_sent_one_failed(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.forget("u-3")  # OneSignal answers it under invalid_aliases
    async with running_service(make_settings(database_url, **push(onesignal_fake))) as svc:
        assert (await svc.post_event(payment(*FIVE))).status_code == 202
        await svc.drain()
        pushes = await rows(svc, "push")
        tried = {d.id: await attempts(svc, d.id) for d in pushes}
    [notification] = onesignal_fake.notifications
    assert sorted(notification.external_ids) == FIVE
    [group] = {d.send_group for d in pushes}
    assert group is not None
    assert notification.body["idempotency_key"] == str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(group)))
    assert [(d.user_id, d.status, d.reason) for d in pushes] == [
        ("u-0", "sent", None),
        ("u-1", "sent", None),
        ("u-2", "sent", None),
        ("u-3", "failed", "not_subscribed"),
        ("u-4", "sent", None),
    ]
    assert {d.provider_message_id for d in pushes if d.status == "sent"} == {notification.id}
    # Every member has its own attempt row, and each shows the group it went with.
    assert {(len(rows_), rows_[0].outcome, rows_[0].send_group) for rows_ in tried.values()} == {
        (1, "sent", group),
        (1, "failed", group),
    }


async def test_a_knock_group_retried_after_a_lost_reply_is_one_workflow_run(
    database_url: str, knock_fake: KnockFake
) -> None:
    # Knock starts the run, then answers after our timeout: the group is retried with the same key.
    with in_front_of(knock_fake.app, knock_key_of, first(1, Late(1.5))) as (url, faults):
        settings = make_settings(database_url, provider_timeout_seconds=0.5, **knock(knock_fake, url))
        async with running_service(settings) as svc:
            assert (await svc.post_event(payment(*people("u-0", "u-1", "u-2")))).status_code == 202
            await svc.drain(15)
            emails = await rows(svc, "email")
            tried = [await attempts(svc, d.id) for d in emails]
    [group] = {d.send_group for d in emails}
    assert faults.seen == {str(group): 2}  # two requests under the group's key
    [run] = knock_fake.triggers  # one workflow run, for all three
    assert sorted(run.recipient_ids) == ["u-0", "u-1", "u-2"]
    assert {(d.status, d.provider_message_id) for d in emails} == {("sent", run.workflow_run_id)}
    assert {tuple(a.outcome for a in rows_) for rows_ in tried} == {("retry", "sent")}


async def test_a_member_retried_alone_by_an_operator_goes_under_its_own_key(
    database_url: str, knock_fake: KnockFake
) -> None:
    knock_fake.fail_next(Fault.http(400, {"code": "invalid", "message": "workflow not found"}))
    async with running_service(make_settings(database_url, **knock(knock_fake))) as svc:
        assert (await svc.post_event(payment(*people("u-0", "u-1", "u-2")))).status_code == 202
        await svc.drain()
        failed = await rows(svc, "email")
        assert {(d.status, d.reason) for d in failed} == {("failed", "rejected")}
        [group] = {d.send_group for d in failed}
        retried = (await svc.client.post(f"/v1/deliveries/{failed[1].id}/retry", headers=svc.auth)).json()
        await svc.drain()
        after = {d.user_id: d for d in await rows(svc, "email")}
    assert retried["send_group"] is None  # it left the group
    assert [t.idempotency_key for t in knock_fake.triggers] == [str(failed[1].id)]
    [run] = knock_fake.triggers
    assert run.recipient_ids == ["u-1"]
    assert {user: (d.status, d.send_group) for user, d in after.items()} == {
        "u-0": ("failed", group),
        "u-1": ("sent", None),
        "u-2": ("failed", group),
    }


async def test_recipients_with_another_template_or_due_time_go_in_another_group(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    recipients = [
        {"id": "en-1", "locale": "en"},
        {"id": "en-2", "locale": "en-GB"},  # the English template too
        {"id": "de-1", "locale": "de"},
        {"id": "de-2", "locale": "de-AT"},  # the German template too
        {"id": "fr-1", "locale": "fr"},  # no French template: English
    ]
    async with running_service(make_settings(database_url, **push(onesignal_fake))) as svc:
        assert (await svc.post_event(payment(*recipients))).status_code == 202
        await svc.drain()
        pushes = await rows(svc, "push")
    groups = Counter(d.send_group for d in pushes)
    assert sorted(groups.values()) == [2, 3]
    by_group = {tuple(sorted(n.external_ids)) for n in onesignal_fake.notifications}
    assert by_group == {("de-1", "de-2"), ("en-1", "en-2", "fr-1")}
    german = next(n for n in onesignal_fake.notifications if "de-1" in n.external_ids)
    assert set(german.body["headings"]) == {"en", "de"}  # each member's language carries the content


async def test_without_send_groups_every_delivery_goes_alone(database_url: str, onesignal_fake: OneSignalFake) -> None:
    settings = make_settings(database_url, send_groups=False, **push(onesignal_fake))
    async with running_service(settings) as svc:
        assert (await svc.post_event(payment(*FIVE))).status_code == 202
        await svc.drain()
        pushes = await rows(svc, "push")
    assert {d.send_group for d in pushes} == {None}
    assert sorted(n.external_ids for n in onesignal_fake.notifications) == [[user] for user in FIVE]
    keys = {n.body["idempotency_key"] for n in onesignal_fake.notifications}
    assert keys == {str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(d.id))) for d in pushes}


async def test_a_single_recipient_goes_alone_under_its_own_key(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    async with running_service(make_settings(database_url, **push(onesignal_fake))) as svc:
        assert (await svc.post_event(payment("solo"))).status_code == 202
        await svc.drain()
        [only] = await rows(svc, "push")
    assert only.send_group is None
    [notification] = onesignal_fake.notifications
    assert notification.body["idempotency_key"] == str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(only.id)))


async def test_in_app_members_get_their_own_inbox_row_and_status(database_url: str) -> None:
    async with running_service(make_settings(database_url)) as svc:
        assert (await svc.post_event(payment(*FIVE))).status_code == 202
        await svc.drain()
        in_app = await rows(svc, "in_app")
        inboxes = {user: (await svc.get(f"/v1/users/{user}/inbox")).json()["data"] for user in FIVE}
    assert len({d.send_group for d in in_app}) == 1
    assert {d.status for d in in_app} == {"sent"}
    assert {user: [m["delivery_id"] for m in items] for user, items in inboxes.items()} == {
        d.user_id: [str(d.id)] for d in in_app
    }


def smtp_channel(server: SmtpServer) -> SmtpEmail:
    return SmtpEmail(host=server.host, port=server.port, sender="noreply@notifier.test", starttls=False, timeout=5)


def email(user: str) -> Message:
    return Message(
        delivery_id=uuid.uuid4(),
        event_id=uuid.uuid4(),
        event_type="payment.received",
        channel=ChannelName.email,
        recipient=Recipient(id=user, email=f"{user}@example.com"),
        title="Payment received",
        body="Thanks",
    )


async def test_smtp_sends_each_member_its_own_message_over_one_connection(smtp_server: SmtpServer) -> None:
    channel = smtp_channel(smtp_server)
    members = tuple(email(user) for user in ("a", "b", "c"))
    smtp_server.fail_next(SmtpFault.permanent("rcpt"))  # the first recipient is refused, alone

    results = await channel.send_group(MessageGroup("group-1", members))

    assert [r.outcome for r in results] == [Outcome.failed, Outcome.sent, Outcome.sent]
    assert smtp_server.sessions == 1  # one connection for the group
    assert [e.rcpt_tos for e in smtp_server.envelopes] == [["b@example.com"], ["c@example.com"]]
    assert [m["Message-ID"] for m in smtp_server.messages] == [
        f"<{members[1].delivery_id}@notifier.test>",
        f"<{members[2].delivery_id}@notifier.test>",
    ]


async def test_smtp_members_not_reached_before_the_server_hangs_up_are_retried(smtp_server: SmtpServer) -> None:
    channel = smtp_channel(smtp_server)
    smtp_server.stop()  # refused: nobody was reached

    results = await channel.send_group(MessageGroup("group-1", tuple(email(user) for user in ("a", "b"))))

    assert [r.outcome for r in results] == [Outcome.retry, Outcome.retry]


async def test_smtp_members_after_a_hang_up_in_the_middle_are_retried_and_those_before_are_sent(
    smtp_server: SmtpServer,
) -> None:
    channel = smtp_channel(smtp_server)
    members = tuple(email(user) for user in ("a", "b", "c"))
    # a's message is accepted; b's is accepted too, but the server hangs up instead of saying so.
    smtp_server.fail_next(SmtpFault.accepted(), SmtpFault.reply_lost())

    results = await channel.send_group(MessageGroup("group-1", members))

    assert [r.outcome for r in results] == [Outcome.sent, Outcome.retry, Outcome.retry]
    assert smtp_server.sessions == 1
    # b's retry carries the same Message-ID, for the receiver to recognise; c was never reached.
    assert [m["Message-ID"] for m in smtp_server.messages] == [
        f"<{members[0].delivery_id}@notifier.test>",
        f"<{members[1].delivery_id}@notifier.test>",
    ]
